"""The web demo: a Gradio app over a loaded model to caption an image, ask about it, see the Q-Former's
attention over it, and search a folder of images by text. Gradio is an optional extra (``blipkit[demo]``)."""

from __future__ import annotations

import html
import ipaddress
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from blipkit.data.images import iter_image_paths, load_image, load_image_bytes
from blipkit.errors import BlipkitError, DataError, one_line

if TYPE_CHECKING:
    from types import ModuleType

    import gradio as gr

    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "build_demo", "is_loopback", "launch_demo"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_UPLOAD = "64mb"
THUMBNAIL_SIDE = 256
HEATMAP_MIN_SIDE = 320
MAX_RESULTS = 24


def _gradio() -> ModuleType:
    """Gradio, with what would reach the internet off: telemetry, and the run history that can be sent to a
    hub (Gradio reads both switches from the environment when it needs them)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_RUN_HISTORY"] = "False"
    try:
        import gradio
    except ImportError:
        raise BlipkitError("the web demo needs Gradio, which is not installed: pip install 'blipkit[demo]'") from None
    return gradio


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Demo:
    """The work behind the page: every handler turns a blipkit error into a message shown on the page,
    and one lock keeps the model to one request at a time."""

    def __init__(self, model: VisionLanguageModel, gr: ModuleType, images: Path | None, any_folder: bool) -> None:
        self.model = model
        self.gr = gr
        self.images = images
        self.any_folder = any_folder
        self.lock = threading.Lock()

    def guarded(self, work: Callable[..., Any]) -> Callable[..., Any]:
        """``work`` with the model lock held, whose errors reach the page as one readable line."""

        def handler(*args: Any) -> Any:
            try:
                with self.lock:
                    return work(*args)
            except BlipkitError as err:
                raise self.gr.Error(html.escape(one_line(err)), print_exception=False) from None
            except Exception as err:
                if os.environ.get("BLIPKIT_DEBUG"):
                    traceback.print_exc()
                message = f"unexpected {type(err).__name__}: {one_line(err)[:300]}; this is a bug in blipkit or a plugin"
                print(f"Error: {message} (BLIPKIT_DEBUG=1 shows the traceback)", file=sys.stderr)
                raise self.gr.Error(html.escape(message), print_exception=False) from None

        handler.__name__ = work.__name__
        return handler

    @staticmethod
    def image(upload: dict[str, Any] | None) -> Image.Image:
        """The uploaded image, decoded by blipkit (Gradio's own decoding is skipped: its errors are not for users)."""
        if not upload or not upload.get("path"):
            raise BlipkitError("no image yet: upload or drop one first")
        name = upload.get("orig_name") or Path(upload["path"]).name
        return load_image_bytes(Path(upload["path"]).read_bytes(), name=name)

    def caption(self, upload: dict[str, Any] | None) -> str:
        return self.model.caption([self.image(upload)])[0]

    def ask(self, upload: dict[str, Any] | None, question: str) -> str:
        if not question or not question.strip():
            raise BlipkitError("no question yet: type one, e.g. 'what colour is the shape?'")
        return self.model.ask([self.image(upload)], [question.strip()])[0]

    def attention(self, upload: dict[str, Any] | None, per_query: bool) -> Image.Image:
        from blipkit.inference import attention_heatmap

        heatmap = attention_heatmap(self.model, self.image(upload), per_query=bool(per_query))
        scale = -(-HEATMAP_MIN_SIDE // min(heatmap.size))
        return heatmap.resize((heatmap.width * scale, heatmap.height * scale), Image.NEAREST) if scale > 1 else heatmap

    def search(self, folder: str, text: str, top_k: float) -> list[tuple[Image.Image, str]]:
        from blipkit.inference import retrieve_images

        if not text or not text.strip():
            raise BlipkitError("no search text yet: describe what to look for, e.g. 'a red circle'")
        paths = list(iter_image_paths([self.folder(folder)]))
        skipped: list[str] = []
        ranked = retrieve_images(self.model, paths, text.strip(), top_k=int(top_k),
                                 on_skip=lambda path, why: skipped.append(one_line(why)))
        if skipped:
            self.gr.Warning(f"skipped {len(skipped)} unreadable image(s): " + "; ".join(skipped[:3]))
        return [(self.thumbnail(path), f"{score:.3f}  {path.name}") for path, score in ranked]

    def folder(self, typed: str) -> Path:
        """The folder to search: the one typed, or the one the demo was started with."""
        typed = (typed or "").strip()
        if typed and self.any_folder:
            return Path(typed).expanduser()
        if self.images is None:
            how = "type a folder of images" if self.any_folder else "start the demo with --images FOLDER"
            raise BlipkitError(f"no folder to search: {how}")
        if typed and Path(typed).expanduser().resolve() != self.images.resolve():
            raise BlipkitError("this demo is reachable from other machines, so it searches only its --images folder")
        return self.images

    @staticmethod
    def thumbnail(path: Path) -> Image.Image:
        picture = load_image(path).convert("RGB")
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        return picture


def build_demo(
    model: VisionLanguageModel, images: str | Path | None = None, any_folder: bool = True, title: str = "blipkit"
) -> gr.Blocks:
    """The Gradio app over ``model``: an image to upload or drop, and tabs to caption it, ask about it, see
    the Q-Former's attention over it, and search ``images`` (or, with ``any_folder``, a typed folder) by text."""
    gr = _gradio()
    demo = _Demo(model, gr, Path(images) if images is not None else None, any_folder)
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {html.escape(title)}\nUpload or drop an image, then caption it, ask about it or see where the model looks.")
        with gr.Row():
            with gr.Column(scale=1):
                picture = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=320)
            with gr.Column(scale=1), gr.Tabs():
                _image_tabs(gr, demo, picture)
                _search_tab(gr, demo)
    app.queue(default_concurrency_limit=1)
    return app


def _image_tabs(gr: ModuleType, demo: _Demo, picture: gr.Image) -> None:
    """The Caption, Ask and Attention tabs over the uploaded image; their handlers get the raw upload
    (preprocess=False) and decode it themselves."""
    with gr.Tab("Caption"):
        caption = gr.Textbox(label="Caption", interactive=False, lines=2)
        caption_button = gr.Button("Caption", variant="primary")
    with gr.Tab("Ask"):
        question = gr.Textbox(label="Question", placeholder="what colour is the shape?")
        ask_button = gr.Button("Ask", variant="primary")
        answer = gr.Textbox(label="Answer", interactive=False)
    with gr.Tab("Attention"):
        per_query = gr.Checkbox(label="One map per query", value=False)
        attention_button = gr.Button("Show attention", variant="primary")
        heatmap = gr.Image(label="Q-Former cross-attention", type="pil", interactive=False, format="png",
                           buttons=["download", "fullscreen"], elem_id="heatmap")
    run_caption = demo.guarded(demo.caption)
    picture.upload(run_caption, picture, caption, preprocess=False)
    picture.clear(lambda: ("", "", None), None, [caption, answer, heatmap])
    caption_button.click(run_caption, picture, caption, preprocess=False)
    run_ask = demo.guarded(demo.ask)
    ask_button.click(run_ask, [picture, question], answer, preprocess=False)
    question.submit(run_ask, [picture, question], answer, preprocess=False)
    attention_button.click(demo.guarded(demo.attention), [picture, per_query], heatmap, preprocess=False)


def _search_tab(gr: ModuleType, demo: _Demo) -> None:
    """The Search tab: text-to-image search over a folder (contrastive similarity, re-ranked by matching)."""
    with gr.Tab("Search"):
        if not demo.model.bridge.supports_retrieval:
            gr.Markdown("This model cannot search: its bridge has no image-text matching heads (a Q-Former "
                        "trained with stage 1 has them).")
            return
        folder = gr.Textbox(label="Folder", value=str(demo.images or ""), interactive=demo.any_folder,
                            placeholder="a folder of images on this machine")
        text = gr.Textbox(label="Looking for", placeholder="a red circle")
        top_k = gr.Slider(1, MAX_RESULTS, value=6, step=1, label="Results")
        search_button = gr.Button("Search", variant="primary")
        results = gr.Gallery(label="Best matches (score, file)", columns=2, height="auto", buttons=["download", "fullscreen"],
                             elem_id="results")
    run_search = demo.guarded(demo.search)
    search_button.click(run_search, [folder, text, top_k], results)
    text.submit(run_search, [folder, text, top_k], results)


def launch_demo(
    model: VisionLanguageModel | str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    images: str | Path | None = None,
    title: str = "blipkit",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the demo of ``model`` (a loaded model, or a run directory to load once Gradio and the address
    are known to work) on ``host``:``port`` until interrupted; no share link, no telemetry. Typed folders
    are searched only when the page is reachable from this machine alone (``host`` is a loopback address)."""
    if images is not None and not Path(images).is_dir():
        raise DataError(f"{images}: not a folder; --images takes a folder of images to search")
    _gradio()
    _check_address(host, port)
    if isinstance(model, (str, Path)):
        from blipkit.model.build import load_model

        model = load_model(model)
    app = build_demo(model, images, any_folder=is_loopback(host), title=title)
    try:
        try:
            app.launch(server_name=host, server_port=port, share=False, quiet=True, show_error=True,
                       prevent_thread_lock=True, max_file_size=MAX_UPLOAD, ssr_mode=False, mcp_server=False, pwa=False)
        except OSError:
            raise _address_error(host, port) from None
        if on_ready is not None:
            on_ready(f"http://{_url_host(host)}:{app.server_port}")
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        app.close(verbose=False)


def _address_error(host: str, port: int) -> BlipkitError:
    return BlipkitError(f"cannot listen on {host}:{port}: the port is taken or the address is not this machine's; "
                        "choose another with --port or --host")


def _check_address(host: str, port: int) -> None:
    """Fail before the server starts (whose own failure is logged at length) when ``host``:``port`` cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise _address_error(host, port) from None


def _url_host(host: str) -> str:
    """``host`` as a browser on this machine reaches it."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host
