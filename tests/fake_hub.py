"""A stand-in for the Hugging Face hub at a process boundary: an HTTP server that answers what
huggingface_hub's `snapshot_download` asks (a repo's revision, its file tree, each file's HEAD and GET,
ranges included) for repos laid out as directories `<root>/<org>/<name>/`. Processes reach it through
HF_ENDPOINT. A repo can be gated (a bearer token is required) and the files throttled, so that a test
can kill a download midway."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_FROM = 100_000  # files from this size are served as LFS files (the hub gives their SHA-256)
CHUNK = 64 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, root: Path, token: str | None = None, gated: tuple[str, ...] = ()):
        self.root, self.token, self.gated = Path(root), token, set(gated)
        self.seconds_per_chunk = 0.0  # > 0: throttled
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> dict[str, bytes]:
        base = self.root / repo
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    def commit(self, repo: str) -> str:
        lines = "".join(f"{rel}\t{hashlib.sha256(data).hexdigest()}\n" for rel, data in self.files(repo).items())
        return hashlib.sha1(lines.encode()).hexdigest()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                repo = (api or resolve).group(1) if (api or resolve) else None
                if repo is None or not (hub.root / repo).is_dir():
                    return self.send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self.send(401, b'{"error": "Access to this gated repo is restricted"}',
                                     {"X-Error-Code": "GatedRepo"})
                files, commit = hub.files(repo), hub.commit(repo)
                if api and api.group(2) == "revision":
                    info = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                            "siblings": [{"rfilename": f} for f in files]}
                    return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                if api:
                    tree = [{"type": "file", "oid": git_blob_id(d), "size": len(d), "path": f,
                             **({"lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                                if len(d) >= LFS_FROM else {})} for f, d in files.items()]
                    return self.send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                data = files.get(resolve.group(3))
                if data is None:
                    return self.send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
                etag = hashlib.sha256(data).hexdigest() if len(data) >= LFS_FROM else git_blob_id(data)
                headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                if len(data) >= LFS_FROM:
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
                start = 0
                if body and (ranged := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))):
                    start = int(ranged.group(1))
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self.send(206 if start else 200, data[start:] if body else None,
                          {**headers, "Content-Length": str(len(data) - start)})

            def send(self, status: int, data: bytes | None, headers: dict[str, str]) -> None:
                self.send_response(status)
                if data is not None and "Content-Length" not in headers:
                    headers = {**headers, "Content-Length": str(len(data))}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if data is None or self.command == "HEAD":
                    return
                for i in range(0, len(data), CHUNK):
                    if hub.seconds_per_chunk:
                        time.sleep(hub.seconds_per_chunk)
                    try:
                        self.wfile.write(data[i:i + CHUNK])
                    except (BrokenPipeError, ConnectionResetError):
                        return

        return Handler


def tiny_llama_repo(directory: Path, arch: dict, texts: list[str]) -> None:
    """A randomly initialised Llama of the given shapes with a byte-level BPE tokenizer, saved as a hub
    repo would hold it."""
    import torch
    from transformers import LlamaForCausalLM

    from retrieval_scaling.backbone import architecture, decoder_config, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, arch["vocab_size"])
    torch.manual_seed(0)
    config = decoder_config(architecture({"arch": arch}), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tiny_cross_encoder_repo(directory: Path, texts: list[str]) -> None:
    """A randomly initialised BERT with one relevance logit, as a cross-encoder teacher's repo."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from retrieval_scaling.backbone import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, 2048)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
