"""`polymodal demo MODEL`: a Gradio app to chat about an uploaded image or video, or a recorded
or uploaded audio clip.

The reply streams token by token from an `AsyncEngine`; temperature, top-p and max tokens
are set per message. The media inputs shown are those the model takes (its processor's
`MODALITIES`); the media is attached to the first user turn, so follow-up questions are still
about it. A speech model whose prompts take `language` / `task` (Whisper) transcribes or
translates each clip on its own instead of chatting: the message box is then optional
previous-context text. Element ids (`pm-image`, `pm-video`, `pm-audio`, `pm-language`,
`pm-task`, `pm-input`, `pm-send`, `pm-chat`, `pm-status`) are stable for browser tests.
"""

from __future__ import annotations

import argparse
from typing import Any

from polymodal.llm_core.sampling_params import SamplingParams

VISUAL = ("image", "video")  # what a model that reports no modalities is offered


def build_messages(
    history: list[dict[str, str]],
    text: str,
    image: str | None,
    video: str | None,
    audio: str | None = None,
) -> list[dict[str, Any]]:
    """Engine chat messages: past text turns plus the new one, media on the first user turn."""
    turns = [*history, {"role": "user", "content": text}]
    messages: list[dict[str, Any]] = []
    attached = False
    for turn in turns:
        content: Any = turn["content"]
        if turn["role"] == "user" and not attached and (image or video or audio):
            parts = [{"type": "image", "image": image}] if image else []
            parts += [{"type": "video", "video": video}] if video else []
            parts += [{"type": "audio", "audio": audio}] if audio else []
            content = [*parts, {"type": "text", "text": turn["content"]}]
            attached = True
        messages.append({"role": turn["role"], "content": content})
    return messages


def build_prompt(
    history: list[dict[str, str]],
    text: str,
    media: dict[str, str | None],
    speech: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """The engine prompt of one message. `media`: image / video / audio (or None). `speech`:
    the language / task of a speech model (Whisper), which gets the clip alone with `text` as
    previous-context text (no chat history); None for a chat model."""
    if speech is None:
        return {"messages": build_messages(history, text, **media)}
    content: list[dict[str, Any]] = [{"type": "audio", "audio": media.get("audio")}]
    content += [{"type": "text", "text": text}] if text else []
    options = {k: v for k, v in speech.items() if v}
    return {"messages": [{"role": "user", "content": content}], **options}


def make_respond(engine: Any, speech_model: bool = False):
    """The app's send handler over `engine` (an `AsyncEngine`): an async generator yielding
    (history, chat, message box, status) as the reply streams. `speech_model`: the model's
    prompts take language / task (Whisper; see `build_prompt`)."""
    defaults = dict(getattr(engine, "model_info", {}).get("default_sampling") or {})

    async def respond(
        text, history, image, video, audio, language, task, temperature, top_p, max_tokens
    ):
        history = list(history or [])
        text = (text or "").strip()
        if speech_model and not audio:
            yield history, history, text, "Record or upload audio first."
            return
        if not text and not speech_model:
            yield history, history, "", "Type a message first."
            return
        media = {"image": image, "video": video, "audio": audio}
        speech = {"language": (language or "").strip(), "task": task} if speech_model else None
        prompt = build_prompt(history, text, media, speech)
        shown = text or f"({task or 'transcribe'} the audio)"
        history = [*history, {"role": "user", "content": shown}]
        params = SamplingParams(
            temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens)
        ).with_defaults(defaults)  # generation_config.json: e.g. Whisper's suppressed tokens
        reply = {"role": "assistant", "content": ""}
        request_id = engine.submit(prompt, params)
        status = "generating..."
        try:
            async for out in engine.stream(request_id):
                reply["content"] = out.outputs[0].text
                u = out.usage
                status = f"{u.prompt_tokens} prompt tokens, {u.completion_tokens} generated"
                yield history, [*history, reply], "", status
        except Exception as exc:  # noqa: BLE001 - show the error, keep the app alive
            yield history[:-1], history[:-1], text, f"Error: {exc}"
            return
        history = [*history, reply]
        yield history, history, "", status + " (done)"

    return respond


def build_demo(engine: Any, title: str = "polymodal demo"):
    """The Gradio Blocks app over an `AsyncEngine` (not launched); it offers the media inputs
    the model takes (`engine.model_info["modalities"]`)."""
    import gradio as gr

    info = getattr(engine, "model_info", None) or {}
    takes = tuple(info.get("modalities") or VISUAL)
    speech_model = "audio" in takes and "task" in (info.get("media_options") or ())
    kinds = {"image": "an image", "video": "a video", "audio": "an audio clip"}
    offered = " or ".join(kinds[k] for k in ("image", "video", "audio") if k in takes)
    hint = (
        "Record or upload an audio clip, then send it to transcribe (or translate) it."
        if speech_model
        else f"Upload {offered}, then ask about it."
    )
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\n{hint}")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    type="filepath", label="Image", elem_id="pm-image", visible="image" in takes
                )
                video = gr.Video(label="Video", elem_id="pm-video", visible="video" in takes)
                audio = gr.Audio(
                    sources=["upload", "microphone"], type="filepath", label="Audio",
                    elem_id="pm-audio", visible="audio" in takes,
                )  # fmt: skip
                language = gr.Textbox(
                    label="Language (e.g. en; multilingual checkpoints need one)",
                    elem_id="pm-language", visible=speech_model,
                )  # fmt: skip
                task = gr.Radio(
                    ["transcribe", "translate"], value="transcribe", label="Task",
                    elem_id="pm-task", visible=speech_model,
                )  # fmt: skip
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                # within the model's context (Whisper's decoder has 448 positions)
                limit = min(1024, int(info.get("max_model_len") or 1024))
                max_tokens = gr.Slider(
                    1, limit, value=min(128, limit // 2), step=1, label="Max tokens"
                )
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Chat", elem_id="pm-chat", height=420)
                box = gr.Textbox(
                    label="Previous-context text (optional)" if speech_model else "Message",
                    placeholder="Words the audio may use..." if speech_model
                    else "Ask about the media...", elem_id="pm-input",
                )  # fmt: skip
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="pm-send")
                    clear = gr.Button("Clear", elem_id="pm-clear")
                status = gr.Markdown("", elem_id="pm-status")
        respond = make_respond(engine, speech_model)
        inputs = [box, history, image, video, audio, language, task, temperature, top_p]
        inputs.append(max_tokens)
        outputs = [history, chat, box, status]
        send.click(respond, inputs, outputs)
        box.submit(respond, inputs, outputs)
        clear.click(lambda: ([], [], "", ""), None, outputs)
    return demo


def demo_command(parser: argparse.ArgumentParser):
    """Add the `demo` arguments; returns `run(args) -> int`."""
    from polymodal.engine_args import add_engine_arguments, engine_kwargs

    parser.description = "A Gradio app: chat about an image, a video or an audio clip."
    parser.add_argument("model", help="hub id or local checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="make a public gradio.live link")
    add_engine_arguments(parser)

    def run(args) -> int:
        from polymodal.async_engine import AsyncEngine

        engine = AsyncEngine(args.model, **engine_kwargs(args))
        demo = build_demo(engine, title=f"polymodal: {args.model.rstrip('/').split('/')[-1]}")
        try:
            demo.queue(default_concurrency_limit=16).launch(
                server_name=args.host, server_port=args.port, share=args.share
            )
        finally:
            engine.close()
        return 0

    return run
