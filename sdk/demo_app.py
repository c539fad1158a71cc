"""`polymodal demo MODEL`: a Gradio app to chat about an uploaded image or video.

The reply streams token by token from an `AsyncEngine`; temperature, top-p and max tokens
are set per message. The uploaded media is attached to the first user turn, so follow-up
questions are still about it. Element ids (`pm-image`, `pm-video`, `pm-input`, `pm-send`,
`pm-chat`, `pm-status`) are stable for browser tests.
"""

from __future__ import annotations

import argparse
from typing import Any

from polymodal.llm_core.sampling_params import SamplingParams


def build_messages(
    history: list[dict[str, str]], text: str, image: str | None, video: str | None
) -> list[dict[str, Any]]:
    """Engine chat messages: past text turns plus the new one, media on the first user turn."""
    turns = [*history, {"role": "user", "content": text}]
    messages: list[dict[str, Any]] = []
    attached = False
    for turn in turns:
        content: Any = turn["content"]
        if turn["role"] == "user" and not attached and (image or video):
            parts = [{"type": "image", "image": image}] if image else []
            parts += [{"type": "video", "video": video}] if video else []
            content = [*parts, {"type": "text", "text": turn["content"]}]
            attached = True
        messages.append({"role": turn["role"], "content": content})
    return messages


def build_demo(engine: Any, title: str = "polymodal demo"):
    """The Gradio Blocks app over an `AsyncEngine` (not launched)."""
    import gradio as gr

    async def respond(text, history, image, video, temperature, top_p, max_tokens):
        history = list(history or [])
        text = (text or "").strip()
        if not text:
            yield history, history, "", "Type a message first."
            return
        messages = build_messages(history, text, image, video)
        history = [*history, {"role": "user", "content": text}]
        params = SamplingParams(
            temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens)
        )
        reply = {"role": "assistant", "content": ""}
        request_id = engine.submit({"messages": messages}, params)
        status = "generating..."
        try:
            async for out in engine.stream(request_id):
                reply["content"] = out.outputs[0].text
                u = out.usage
                status = f"{u.prompt_tokens} prompt tokens, {u.completion_tokens} generated"
                yield history, [*history, reply], "", status
        except Exception as exc:  # noqa: BLE001 - show the error, keep the app alive
            yield history, history, text, f"Error: {exc}"
            return
        history = [*history, reply]
        yield history, history, "", status + " (done)"

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nUpload an image or a video, then ask about it.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", elem_id="pm-image")
                video = gr.Video(label="Video", elem_id="pm-video")
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max tokens")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Chat", elem_id="pm-chat", height=420)
                box = gr.Textbox(
                    label="Message", placeholder="Ask about the media...", elem_id="pm-input"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="pm-send")
                    clear = gr.Button("Clear", elem_id="pm-clear")
                status = gr.Markdown("", elem_id="pm-status")
        inputs = [box, history, image, video, temperature, top_p, max_tokens]
        outputs = [history, chat, box, status]
        send.click(respond, inputs, outputs)
        box.submit(respond, inputs, outputs)
        clear.click(lambda: ([], [], "", ""), None, outputs)
    return demo


def demo_command(parser: argparse.ArgumentParser):
    """Add the `demo` arguments; returns `run(args) -> int`."""
    from polymodal.engine_args import add_engine_arguments, engine_kwargs

    parser.description = "A Gradio app: upload an image or video and chat about it."
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
