"""The decode step's cost model and the plan of each step (llm.engine.pacing)."""

import pytest

from llm.engine.pacing import Plan, StepCost, plan_step

CPU = StepCost(fixed=0.002, per_token=0.005)  # each token's compute dwarfs what a pass costs anyway
GPU = StepCost(fixed=0.015, per_token=0.00005)  # the pass over the weights dominates until hundreds of tokens


def test_the_cost_is_unknown_until_steps_of_two_sizes_were_timed():
    cost = StepCost()
    assert cost.line() is None and cost.worth_joining(8, 1000)
    assert cost.as_stats() == {"step_fixed_seconds": None, "step_token_seconds": None}
    cost.observe(4, 0.026)
    cost.observe(4, 0.026)
    assert cost.line() is None
    cost.observe(22, 0.098)
    fixed, per_token = cost.line()
    assert fixed == pytest.approx(0.010) and per_token == pytest.approx(0.004)
    assert cost.as_stats() == {"step_fixed_seconds": fixed, "step_token_seconds": per_token}


def test_a_long_run_of_one_step_size_does_not_wash_out_the_others():
    cost = StepCost()
    cost.observe(22, 0.098)
    for _ in range(1000):  # steady decoding of four streams
        cost.observe(4, 0.026)
    assert cost.line() == (pytest.approx(0.010), pytest.approx(0.004))


def test_new_durations_move_the_line_and_noise_never_makes_it_negative():
    cost = StepCost()
    cost.observe(1, 0.008)
    cost.observe(64, 0.300)
    before = cost.line()
    for _ in range(30):  # the machine got busier: every pass costs more
        cost.observe(1, 0.020)
    assert cost.line()[0] > before[0]
    falling = StepCost()
    falling.observe(1, 0.030)  # a preempted single-token step
    falling.observe(16, 0.010)
    assert falling.line() == (pytest.approx(0.020), 0.0)
    steep = StepCost()
    steep.observe(1, 0.001)
    steep.observe(100, 0.5)
    assert steep.line() == (0.0, pytest.approx(0.499 / 99))


def test_a_given_cost_is_kept():
    cost = StepCost(fixed=0.002, per_token=0.005)
    cost.observe(1, 1.0)
    cost.observe(100, 1.0)
    assert cost.line() == (0.002, 0.005)


@pytest.mark.parametrize("generating, prompts, stalled, budget, cost, expected", [
    # Nothing learnt yet: every generating stream and every prompt that fits, as one batch.
    (3, [22, 22, 22], 0, 256, StepCost(), Plan(True, [(0, 22), (1, 22), (2, 22)])),
    # A CPU: the oldest prompt alone, without the generating streams (a token each would delay its first).
    (3, [22, 22, 22], 0, 256, CPU, Plan(False, [(0, 22)])),
    # ... and no later than their budget of prefilled tokens allows: then they decode, alone.
    (3, [22, 22], 240, 256, CPU, Plan(True, [])),
    (3, [22, 22], 256, 256, CPU, Plan(True, [])),
    # A prompt that fits a whole budget waits for one rather than being cut to fill what is left.
    (3, [40], 230, 256, StepCost(), Plan(True, [])),
    # A prompt longer than the budget is prefilled in chunks of what is left of it.
    (3, [1746], 0, 256, CPU, Plan(False, [(0, 256)])),
    (3, [1746], 200, 256, StepCost(), Plan(True, [(0, 56)])),
    # Nobody generating: the solo budget, the oldest prompt first.
    (0, [1746, 22], 0, 512, CPU, Plan(False, [(0, 512)])),
    (0, [22, 30], 0, 512, CPU, Plan(False, [(0, 22)])),
    # Many tiny prompts waiting: a few share a step, while the pass saved for all behind is worth more than the wait.
    (0, [22] * 16, 0, 512, CPU, Plan(False, [(0, 22)])),
    (0, [2] * 16, 0, 512, CPU, Plan(False, [(0, 2), (1, 2), (2, 2)])),
    # A GPU: short prompts and the generating streams all join one step (within the budget).
    (8, [22, 300, 22], 0, 512, GPU, Plan(True, [(0, 22), (1, 300), (2, 22)])),
    (8, [300, 300], 0, 512, GPU, Plan(True, [(0, 300)])),
    (32, [], 0, 512, GPU, Plan(True, [])),
])
def test_plan_step(generating, prompts, stalled, budget, cost, expected):
    assert plan_step(generating, prompts, stalled, budget, cost) == expected


def test_four_prompts_together_on_a_cpu_get_their_first_tokens_one_step_apart_with_no_stream_stalled_long():
    """Simulated steps: the streams waiting for tokens never go more than the budget without one, each prompt is
    prefilled in a step of its own in the order they came, and the generating streams then decode together."""
    prompts, generating, stalled, steps = [22, 23, 21, 22], 1, 0, []
    while prompts:
        plan = plan_step(generating, prompts, stalled, 48, CPU)
        steps.append(plan)
        for index, tokens in reversed(plan.chunks):
            prompts[index] -= tokens
            if not prompts[index]:
                del prompts[index]
                generating += 1
        stalled = stalled + plan.prompt_tokens if not plan.decode else 0
        assert stalled <= 48
    assert [plan.chunks for plan in steps] == [[(0, 22)], [(0, 23)], [], [(0, 21)], [(0, 22)]]
    assert [plan.decode for plan in steps] == [False, False, True, False, False]
