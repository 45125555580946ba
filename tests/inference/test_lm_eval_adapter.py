"""The lm-eval model ``longctx``: its log-likelihoods equal the model's own computation, and a local
task (offline YAML and JSON) runs end to end through lm_eval.simple_evaluate."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.inference.oracles import reference_model

pytest.importorskip("lm_eval")

DOCS = [{"context": "The pass key is 12345. The pass key is", "target": " 12345"},
        {"context": "def f(x):\n    return", "target": " x"},
        {"context": "", "target": "Hello"}]



def _direct(rank, world_size, root):
    from lm_eval.api.instance import Instance

    from longctx_megatron.eval.lm_eval_adapter import LongctxLM

    lm = LongctxLM(load=root, tokenizer_type="ByteTokenizer", prefill_chunk="5", max_length="64")
    requests = [Instance("loglikelihood", doc, (doc["context"], doc["target"]), i) for i, doc in enumerate(DOCS)]
    rolling = [Instance("loglikelihood_rolling", {}, ("some text " * 20,), 0)]
    until = [Instance("generate_until", {}, ("Hello", {"until": ["\n"], "max_gen_toks": 5}), 0)]
    return lm.loglikelihood(requests), lm.loglikelihood_rolling(rolling), lm.generate_until(until)


@pytest.mark.slow
def test_loglikelihoods_equal_the_models_own(checkpoint):
    from longctx_megatron.data.tokenizers import ByteTokenizer

    [(pairs, rolling, generated)] = run_on_ranks(_direct, 1, checkpoint)
    model, tokenizer = reference_model(checkpoint), ByteTokenizer()
    for doc, (logprob, greedy) in zip(DOCS, pairs, strict=True):
        context = tokenizer.encode(doc["context"]) or [tokenizer.eod]
        target = tokenizer.encode(doc["target"])
        with torch.no_grad():
            logits = model(torch.tensor([context + target]))[0][0].log_softmax(-1)
        rows = logits[len(context) - 1:len(context) + len(target) - 1]
        assert logprob == pytest.approx(float(rows.gather(1, torch.tensor(target)[:, None]).sum()), rel=1e-5)
        assert greedy == bool(torch.equal(rows.argmax(-1), torch.tensor(target)))
    text = tokenizer.encode("some text " * 20)
    want = 0.0
    for start in range(0, len(text), 64):  # windows of max_length, each after an end-of-document token
        piece = [tokenizer.eod] + text[start:start + 64]
        with torch.no_grad():
            logits = model(torch.tensor([piece[:-1]]))[0][0].log_softmax(-1)
        want += float(logits.gather(1, torch.tensor(piece[1:])[:, None]).sum())
    assert rolling[0] == pytest.approx(want, rel=1e-5)
    assert isinstance(generated[0], str) and "\n" not in generated[0]


def _simple_evaluate(rank, world_size, root, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import longctx_megatron.eval.lm_eval_adapter  # noqa: F401  (registers "longctx")

    results = lm_eval.simple_evaluate(model="longctx", model_args=f"load={root},tokenizer_type=ByteTokenizer",
                                      tasks=["longctx_local_check"], task_manager=TaskManager(include_path=task_dir),
                                      log_samples=True, bootstrap_iters=0)  # no stderr: it forks a pool
    samples = results["samples"]["longctx_local_check"]
    return results["results"]["longctx_local_check"], [sample["resps"][0][0][0] for sample in samples]


@pytest.mark.slow
def test_a_local_task_runs_through_simple_evaluate(checkpoint, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS[:2]))
    (tmp_path / "task.yaml").write_text(
        "task: longctx_local_check\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    [(metrics, responses)] = run_on_ranks(_simple_evaluate, 1, checkpoint, str(tmp_path), timeout=600)
    [(pairs, _, _)] = run_on_ranks(_direct, 1, checkpoint)
    assert [pytest.approx(logprob, rel=1e-5) for logprob, _ in pairs[:2]] == responses
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(responses) / len(responses)), rel=1e-5)


def _hugging_face_tokenizer(path: str) -> None:
    """A word-level Hugging Face tokenizer of the built-in corpus, saved to ``path``: RULER sizes
    its prompts with a Hugging Face tokenizer, and none can be downloaded here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from longctx_megatron.data.builtin_corpus import builtin_documents

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(builtin_documents(), trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)


def _ruler(rank, world_size, root, tokenizer_dir):
    import lm_eval

    import longctx_megatron.eval.lm_eval_adapter  # noqa: F401  (registers "longctx")

    results = lm_eval.simple_evaluate(
        model="longctx", model_args=f"load={root},tokenizer_type=ByteTokenizer", tasks=["niah_single_1"],
        metadata={"tokenizer": tokenizer_dir, "max_seq_lengths": [4096]}, limit=2, log_samples=True,
        bootstrap_iters=0, gen_kwargs={"max_gen_toks": 16})  # the task's 128 only cost time here
    samples = results["samples"]["niah_single_1"]
    return results["results"]["niah_single_1"], [sample["resps"][0][0] for sample in samples]


@pytest.mark.slow
def test_rulers_needle_task_runs_through_the_adapter(checkpoint, tmp_path):
    """lm-eval's own RULER niah_single_1 (its synthetic "repeat" haystack: no download) at 4096,
    the shortest length RULER reports, through the ``longctx`` model."""
    pytest.importorskip("wonderwords")
    tokenizer_dir = str(tmp_path / "hf-tokenizer")
    _hugging_face_tokenizer(tokenizer_dir)
    [(metrics, responses)] = run_on_ranks(_ruler, 1, checkpoint, tokenizer_dir, timeout=600)
    assert len(responses) == 2 and all(isinstance(text, str) for text in responses)
    assert 0.0 <= metrics["4096,none"] <= 100.0


def test_model_args_reach_megatrons_tokenizers():
    """vocab_file / merge_file reach GPT2BPETokenizer as on the command line: a missing one is named before
    any checkpoint is read."""
    from longctx_megatron.eval.lm_eval_adapter import LongctxLM

    with pytest.raises(ValueError, match="GPT2BPETokenizer needs --vocab-file and --merge-file"):
        LongctxLM(load="unused", tokenizer_type="GPT2BPETokenizer", vocab_file="vocab.json")
