"""The decoder over document caches: forks share the prefix, batched steps give each sequence's own greedy answer."""

from __future__ import annotations

import kvforge
from kvforge.decoder import Decoder

TEXTS = {
    "alpha": "The assert statement is a convenient way to insert debugging assertions. The code is 4471. " * 5,
    "beta": "The pass statement is a null operation; nothing happens when it executes. The colour is teal. " * 7,
}
QUESTIONS = ["What is the code?", "What happens when it executes?", "Tell me about the colour."]


def _docs(tmp_path, model, method="knorm", keep=0.5):
    for name, text in TEXTS.items():
        (tmp_path / f"{name}.txt").write_text(text)
    kvforge.build([tmp_path / f"{n}.txt" for n in TEXTS], tmp_path / "out", method=method, keep=keep, model=model,
                  progress=False)
    return {n: kvforge.load(tmp_path / "out" / f"{n}.kv", model=model) for n in TEXTS}


def test_batched_steps_equal_sequential_answers(tmp_path, tiny_model):
    docs = _docs(tmp_path, tiny_model)
    jobs = [(docs[name], q, n) for name in docs for q, n in zip(QUESTIONS, (12, 5, 9))]
    alone = [d.run(q, max_new_tokens=n) for d, q, n in jobs]
    decoder = Decoder(next(iter(docs.values())).lm, batch=True)
    seqs = [decoder.start(d.document, d.question_ids(q), n) for d, q, n in jobs]
    while any(not s.done for s in seqs):
        for s in seqs:
            s.advance()
        decoder.step(seqs)
    assert sum(len(a.ids) for a in alone) > 2 * len(jobs)  # the sequences ran side by side for several steps
    assert [s.tokens for s in seqs] == [a.ids for a in alone]
    assert [s.stats().finish_reason for s in seqs] == [a.stats.finish_reason for a in alone]


def test_run_returns_its_result_and_leaves_the_document_pristine(tmp_path, tiny_llama):
    doc = _docs(tmp_path, tiny_llama)["alpha"]
    before = doc.resident_kv_bytes()
    first = doc.run(QUESTIONS[0], max_new_tokens=6)
    assert first.stats.question_tokens == len(doc.question_ids(QUESTIONS[0]))
    assert first.stats.new_tokens == len(first.ids) <= 6
    assert first.stats.finish_reason in ("stop", "length")
    assert doc.run(QUESTIONS[0], max_new_tokens=6).ids == first.ids
    assert doc.resident_kv_bytes() == before
    assert not hasattr(doc, "last")


def test_quantized_codes_resident_answer_like_dequantized_on_load(tmp_path, tiny_model):
    (tmp_path / "alpha.txt").write_text(TEXTS["alpha"])
    for quant in ("int8", "int4"):
        for out in (tmp_path / f"kv-{quant}", tmp_path / f"lib-{quant}.zarr"):
            kvforge.build([tmp_path / "alpha.txt"], out, method="knorm", keep=0.5, model=tiny_model, quant=quant,
                          progress=False)
            path, doc = (out / "alpha.kv", None) if out.suffix != ".zarr" else (out, "alpha")
            flat = kvforge.load(path, model=tiny_model, doc=doc)
            codes = kvforge.load(path, model=tiny_model, doc=doc, resident="codes")
            assert codes.document.prefix.layers[0].codes is not None and not codes.artifact.kv.keys
            assert codes.answer_ids(QUESTIONS[0], max_new_tokens=10) == flat.answer_ids(QUESTIONS[0], max_new_tokens=10)
            probe = flat.answer_ids(QUESTIONS[1], max_new_tokens=6) or [5, 6]
            assert (codes.logits(QUESTIONS[1], probe) == flat.logits(QUESTIONS[1], probe)).all()  # bit for bit
            # codes cost what is stored (plus scales), not the dequantized float16
            assert codes.resident_kv_bytes() < (0.6 if quant == "int8" else 0.35) * flat.resident_kv_bytes()
