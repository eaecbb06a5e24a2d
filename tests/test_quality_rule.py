"""The quality rule (acceptance.quality: perplexity, accuracy, either, both) and the accuracy bar's noise rule, on
constructed results: which bars a verdict rests on, a task near chance reported but not judged, and a drop that meets
the bar only within its noise failing."""

import pytest
from pydantic import ValidationError

from quantloop.eval.criteria.accuracy import TaskAccuracy, mean_drop, task_result
from quantloop.eval.criteria.base import verdict
from quantloop.schemas import AcceptanceCriteria, AccuracySettings, CriterionResult


def result(name: str, passed: bool, binding: bool = True) -> CriterionResult:
    return CriterionResult(name=name, passed=passed, measured=0.0, threshold="-", detail="-", binding=binding)


def results(ppl: bool, acc: bool, speed: bool = True, held_out: bool = True) -> list[CriterionResult]:
    return [result("perplexity", ppl), result("perplexity:bible", held_out), result("speed", speed), result("size", True),
            result("accuracy:arc_easy", acc), result("accuracy:os_pci", False, binding=False)]


@pytest.mark.parametrize("rule, ppl, acc, passed, carried", [
    ("either", True, True, True, ["perplexity", "accuracy"]),
    ("either", False, True, True, ["accuracy"]),
    ("either", True, False, True, ["perplexity"]),
    ("either", False, False, False, []),
    ("both", True, False, False, []),
    ("both", True, True, True, ["perplexity", "accuracy"]),
    ("perplexity", True, False, True, ["perplexity"]),
    ("perplexity", False, True, False, []),
    ("accuracy", False, True, True, ["accuracy"]),
])
def test_the_quality_rule_decides_which_bar_must_hold(rule, ppl, acc, passed, carried):
    acceptance = AcceptanceCriteria(accuracy=AccuracySettings(), quality=rule)
    assert verdict(results(ppl, acc), acceptance) == (passed, carried)


def test_a_failing_held_out_domain_fails_the_perplexity_bar_and_other_bars_always_bind():
    acceptance = AcceptanceCriteria(accuracy=AccuracySettings(), quality="either")
    assert verdict(results(True, False, held_out=False), acceptance) == (False, [])
    assert verdict(results(True, True, speed=False), acceptance) == (False, [])


def test_without_an_accuracy_section_every_result_must_pass_as_before():
    acceptance = AcceptanceCriteria()
    plain = [r for r in results(True, True) if not r.name.startswith("accuracy")]
    assert verdict(plain, acceptance) == (True, ["perplexity"])
    assert verdict(plain[:1] + [result("generation", False)], acceptance)[0] is False
    with pytest.raises(ValidationError, match="needs an accuracy section"):
        AcceptanceCriteria(quality="both")


def test_a_quality_bar_without_binding_results_cannot_carry_the_verdict():
    acceptance = AcceptanceCriteria(accuracy=AccuracySettings(), quality="accuracy")
    only_near_chance = [result("perplexity", True), result("accuracy:os_pci", True, binding=False)]
    assert verdict(only_near_chance, acceptance) == (False, [])


def task(drop: float, se: float, base: float = 0.6, chance: float = 0.25) -> TaskAccuracy:
    return TaskAccuracy(metric="acc", items=400, chance=chance, base_acc=base, base_acc_stderr=0.02, quant_acc=base - drop / 100,
                        quant_acc_stderr=0.02, drop_pp=drop, drop_stderr_pp=se, changed=30, above_chance=base - chance > 0.05,
                        seconds=1.0)


def test_an_accuracy_drop_below_the_bar_only_within_its_noise_fails():
    settings = AccuracySettings(max_drop_pp=2.0)
    clear = task_result("accuracy:arc_easy", task(0.5, 0.6), settings, sigmas=2.0)  # 2.5 standard errors below the bar
    noisy = task_result("accuracy:arc_easy", task(1.5, 0.6), settings, sigmas=2.0)  # below the bar, within 2 of them
    over = task_result("accuracy:arc_easy", task(3.0, 0.4), settings, sigmas=2.0)
    assert clear.passed and clear.margin_sigmas == pytest.approx(2.5)
    assert not noisy.passed and "not shown" in noisy.detail and noisy.margin_sigmas == pytest.approx(5 / 6)
    assert not over.passed and over.margin_sigmas == pytest.approx(-2.5)
    identical = task_result("accuracy:arc_easy", task(0.0, 0.0), settings, sigmas=2.0)
    assert identical.passed and identical.margin_sigmas == float("inf")


def test_a_task_the_float_model_does_not_beat_chance_on_is_reported_not_judged():
    r = task_result("accuracy:os_pci", task(0.0, 1.0, base=0.27, chance=0.25), AccuracySettings(), sigmas=2.0)
    assert r.binding is False and "reported, not judged" in r.detail
    assert "binding" not in task_result("accuracy:arc_easy", task(0.0, 1.0), AccuracySettings(), 2.0).model_dump()


def test_the_mean_drop_counts_only_tasks_that_carry_a_verdict():
    m = {"measurements.accuracy.tasks.arc_easy.drop_pp": 1.0, "measurements.accuracy.tasks.arc_easy.drop_stderr_pp": 0.3,
         "measurements.accuracy.tasks.piqa.drop_pp": 3.0, "measurements.accuracy.tasks.piqa.drop_stderr_pp": 0.4,
         "measurements.accuracy.tasks.os_pci.drop_pp": 9.0, "measurements.accuracy.tasks.os_pci.drop_stderr_pp": 2.0,
         "measurements.accuracy.tasks.os_pci.above_chance": 0.0}
    mean, se = mean_drop(m)
    assert mean == pytest.approx(2.0) and se == pytest.approx((0.3**2 + 0.4**2) ** 0.5 / 2)
    assert mean_drop({}) == (None, None)


def test_tasks_are_measured_most_informative_per_second_first():
    from quantloop.benchmarks.score import TaskScore
    from quantloop.eval.criteria.accuracy import informative_first

    def score(task, acc, se, seconds):
        return TaskScore(task=task, items=100, acc=acc, acc_stderr=se, acc_norm=acc, acc_norm_stderr=se, correct=[1] * 100,
                         chosen=[0] * 100, doc_ids=list(range(100)), seconds=seconds, items_per_s=100 / seconds)

    base = {"hellaswag": score("hellaswag", 0.45, 0.02, 100.0),  # 10 sigma above chance (0.25), 1 s per item
            "arc_easy": score("arc_easy", 0.55, 0.05, 10.0),  # 4.5 sigma above chance, 0.1 s per item
            "os_pci": score("os_pci", 0.26, 0.04, 1.0)}  # at chance, however cheap
    assert informative_first(base) == ["arc_easy", "hellaswag", "os_pci"]
