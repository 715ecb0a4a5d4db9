"""A local stand-in for the Hugging Face hub: what huggingface_hub's downloads ask of it, on 127.0.0.1.

`StandInHub(repos)` serves each repo (id -> {file name: bytes}) at one commit through the endpoints
`HfApi.model_info` and `hf_hub_download` use: `GET /api/models/{id}[/revision/{rev}]` (files with
sizes), `HEAD`/`GET /{id}/resolve/{rev}/{file}` with ETag, X-Repo-Commit, Content-Length and byte
ranges (206 + Content-Range). An unknown repo gets 404 with `X-Error-Code: RepoNotFound`, as the hub
sends. Point a process at it with HF_ENDPOINT=hub.url. Misbehaviour, set per test:
- `stall_api`: accept API requests and never answer; `stall_heads`: the same for file look-ups (HEAD);
- `stall_files`: send these files' headers and first `STALL_AFTER` bytes (none to a retry), then nothing;
- `slow_files`: send these files in small chunks with a pause between them (`sending` is set once a
  file's first bytes are out, so a test can interrupt the download mid-file);
- `held_files`: send these files' first chunk, then each further chunk only for a permit the test
  gives with `release(n)` (n chunks), so a test paces the download by what it has seen, not by time;
- `no_sizes`: the file list carries no sizes (as some mirrors and old repos answer);
- `cut_once`: close the connection after half of these files' bodies, the first time only.
Every request is logged in `requests` as (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 4096
SLOW_PAUSE_S = 0.05
STALL_AFTER = 1000
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class StandInHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []
        self.stall_api = False
        self.stall_heads = False
        self.stall_files: set[str] = set()
        self.slow_files: set[str] = set()
        self.held_files: set[str] = set()
        self.no_sizes = False
        self.permits = threading.Semaphore(0)  # chunks of `held_files` the test has let through
        self.cut_once: set[str] = set()
        self.sending: dict[str, threading.Event] = {}
        self.closing = threading.Event()  # set on shutdown: stalled handlers give up
        self.server = QuietServer(("127.0.0.1", 0), make_handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def file_requests(self, method: str = "GET") -> list[str]:
        """The file names requested with `method`, in order."""
        return [
            RESOLVE.match(path)["file"] for verb, path, _ in self.requests if verb == method and RESOLVE.match(path)
        ]

    def release(self, chunks: int) -> None:
        """Let `chunks` more chunks of the held files go out."""
        self.permits.release(chunks)

    def wait_for_permit(self) -> bool:
        """Block a held file's next chunk until the test releases one; False once the hub shuts down."""
        while not self.permits.acquire(timeout=0.1):
            if self.closing.is_set():
                return False
        return True

    def sending_event(self, name: str) -> threading.Event:
        return self.sending.setdefault(name, threading.Event())


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up (Ctrl-C, a timeout) is what the tests do on purpose: no traceback."""


def etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet: the test output is for assertions
            pass

        def do_GET(self) -> None:
            self.answer(send_body=True)

        def do_HEAD(self) -> None:
            self.answer(send_body=False)

        def answer(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if match := API.match(path):
                self.model_info(match["repo"])
            elif (match := RESOLVE.match(path)) and self.command == "HEAD" and hub.stall_heads:
                hub.closing.wait()
            elif match := RESOLVE.match(path):
                self.resolve(match["repo"], match["file"], send_body)
            else:
                self.reply(404, b"not found", {"X-Error-Code": "EntryNotFound"})

        def model_info(self, repo: str) -> None:
            if hub.stall_api:
                hub.closing.wait()
                return
            files = hub.repos.get(repo)
            if files is None:
                self.reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                return
            siblings = [
                {"rfilename": name, "blobId": etag(data)[:40]} | ({} if hub.no_sizes else {"size": len(data)})
                for name, data in sorted(files.items())
            ]
            body = json.dumps(
                {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}
            ).encode()
            self.reply(200, body, {"Content-Type": "application/json"})

        def resolve(self, repo: str, name: str, send_body: bool) -> None:
            files = hub.repos.get(repo)
            if files is None or name not in files:
                code = "RepoNotFound" if files is None else "EntryNotFound"
                self.reply(404, b"", {"X-Error-Code": code})
                return
            data = files[name]
            start = range_start(self.headers.get("Range"))
            headers = {
                "ETag": f'"{etag(data)}"',
                "X-Repo-Commit": COMMIT,
                "Accept-Ranges": "bytes",
                "Content-Length": str(len(data) - start),
            }
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(206 if start else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.send_file(name, data[start:], resumed=start > 0)

        def send_file(self, name: str, body: bytes, resumed: bool) -> None:
            if name in hub.stall_files:
                self.wfile.write(b"" if resumed else body[:STALL_AFTER])  # a retry gets nothing at all
                self.wfile.flush()
                hub.closing.wait()
                return
            if name in hub.cut_once:
                hub.cut_once.discard(name)
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            for offset in range(0, len(body), CHUNK):
                if offset and name in hub.held_files and not hub.wait_for_permit():
                    return
                self.wfile.write(body[offset : offset + CHUNK])
                self.wfile.flush()
                if name in hub.slow_files:
                    hub.sending_event(name).set()
                    if hub.closing.wait(SLOW_PAUSE_S):
                        return

        def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def range_start(header: str | None) -> int:
    """The first byte asked for by `Range: bytes=N-` (the only form huggingface_hub sends), else 0."""
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match[1]) if match else 0
