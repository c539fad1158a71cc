"""Vision/audio towers and projectors: media tensors -> embeddings [n_slots, hidden]."""
