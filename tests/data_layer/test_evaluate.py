import torch

from moekit.data.config import FramesSpec
from moekit.data.schema import Sample
from moekit.evaluate.choices import final_answer_logprobs, normalise_answer, score_choices, score_generated


def _mc(sid, answer, choices, task="colour"):
    return Sample.model_validate(
        {
            "id": sid,
            "task": task,
            "choices": choices,
            "conversations": [
                {"from": "human", "value": "What colour is the square ?"},
                {"from": "gpt", "value": answer},
            ],
        }
    )


def test_final_answer_logprobs_only_count_the_last_answer():
    logits = torch.zeros(1, 6, 4)
    logits[0, 4, 3] = 2.0  # predicts token 3 at position 5
    labels = torch.tensor([[-100, 1, -100, -100, -100, 3]])  # an earlier answer (token 1), the final answer (3)
    total, count = final_answer_logprobs(logits, labels)
    expected = 2.0 - torch.logsumexp(torch.tensor([0.0, 0.0, 0.0, 2.0]), 0)
    assert count.tolist() == [1] and torch.allclose(total, expected[None], atol=1e-6)


def test_ranking_follows_the_model(preprocessor):
    """A real tiny model whose output head is biased towards 'blue': ranking must pick blue, and only blue."""
    from moekit.demo.tiny import tiny_model

    model = tiny_model("qwen2")
    model.resize_token_embeddings(len(preprocessor.tokenizer))
    blue = preprocessor.tokenizer.convert_tokens_to_ids("blue")
    bias = torch.zeros(len(preprocessor.tokenizer))
    bias[blue] = 20.0
    model.lm_head.bias = torch.nn.Parameter(bias)
    text_only = type(preprocessor)(preprocessor.tokenizer, None, "qwen2")
    samples = [
        _mc("a", "blue", ["red", "blue", "green"]),
        _mc("b", "red", ["red", "blue"]),
        _mc("c", "green", ["green", "yellow"], "other"),
    ]
    report = score_choices(model, text_only, samples, ".", frames=FramesSpec())
    assert [s["predicted"] for s in report["samples"][:2]] == ["blue", "blue"]
    assert report["per_task"]["colour"]["correct"] == 1 and report["per_task"]["colour"]["total"] == 2
    assert report["total"] == 3 and abs(report["per_task"]["colour"]["chance"] - (1 / 3 + 1 / 2) / 2) < 1e-9
    scores = report["samples"][0]["scores"]
    assert scores["blue"] > scores["red"] + 15


def test_generated_answers():
    samples = [
        _mc("a", "blue", ["red", "blue"]),
        _mc("b", "the red box", ["the red box", "the blue ball"], "nearer"),
        _mc("c", "red", ["red", "blue"]),
    ]
    report = score_generated({"a": "Blue.", "b": "I think it is the red box", "c": "red or blue"}, samples)
    assert [s["correct"] for s in report["samples"]] == [True, True, False]
    assert normalise_answer("The Red  box!") == "red box"
    assert score_generated({}, samples)["accuracy"] == 0.0
