"""The learning rate per configuration: the grid (by method, checked), the pilots' keys and groups, the choice, the
sweep file's keys and bad input, and the report's "Learning rates" section on toy runs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import yaml

from entrypoints import sweep as sweep_entry
from lora_efficiency.cli import run_cli
from lora_efficiency.config import TrainConfig, build_config, load_yaml, read_defaults
from lora_efficiency.configuration import sweep_key
from lora_efficiency.errors import ConfigError
from lora_efficiency.lr_tuning import (
    ANY_METHOD,
    LrGrid,
    NoLearningRate,
    PilotResult,
    beyond_edge,
    choose_lr,
    group_id,
    lr_settings,
    main_tags,
    parse_lr_grid,
    pilot_config,
    pilot_key,
    pilot_tags,
)
from lora_efficiency.report.lr import lr_section, pilots_in_scope
from lora_efficiency.report.runs import RunData, Scope
from lora_efficiency.sweep import load_sweep


def config(**over) -> TrainConfig:
    return build_config(TrainConfig, {**read_defaults("train"), **over})


def pilot(lr: float, status: str = "FINISHED", **metrics: float) -> PilotResult:
    metrics = {k.replace("_", "/"): v for k, v in metrics.items()}
    return PilotResult(lr, f"run-{lr}", status, metrics, "" if status == "FINISHED" else "boom")


# --- the choice ---------------------------------------------------------------------------------------------------


def test_the_lowest_final_val_loss_wins():
    choice = choose_lr([pilot(1e-4, val_loss=2.0), pilot(3e-4, val_loss=1.7), pilot(1e-3, val_loss=1.9)])
    assert (choice.lr, choice.metric, choice.value) == (3e-4, "val/loss", 1.7)
    assert choice.grid == (1e-4, 3e-4, 1e-3) and choice.excluded == ()


def test_val_loss_is_preferred_to_eval_loss():
    choice = choose_lr([pilot(1e-4, val_loss=2.0, eval_loss=1.0), pilot(3e-4, val_loss=1.9, eval_loss=3.0)])
    assert (choice.lr, choice.metric) == (3e-4, "val/loss")


def test_eval_loss_when_a_pilot_logged_no_val_loss():
    choice = choose_lr([pilot(1e-4, eval_loss=2.0), pilot(3e-4, val_loss=1.0, eval_loss=2.5)])
    assert (choice.lr, choice.metric, choice.value) == (1e-4, "eval/loss", 2.0)  # one metric for every pilot


def test_failed_and_diverged_pilots_are_left_out():
    pilots = [
        pilot(1e-4, val_loss=2.0),
        pilot(3e-4, val_loss=math.nan),
        pilot(1e-3, val_loss=math.inf),
        pilot(3e-3, "FAILED"),
    ]
    choice = choose_lr(pilots)
    assert choice.lr == 1e-4
    assert len(choice.excluded) == 3
    assert "lr=0.0003: diverged (val/loss=nan)" in choice.excluded
    assert any("lr=0.003: FAILED (boom)" in e for e in choice.excluded)


def test_a_tie_goes_to_the_smaller_learning_rate():
    assert choose_lr([pilot(3e-4, val_loss=1.5), pilot(1e-4, val_loss=1.5)]).lr == 1e-4


def test_every_pilot_failed_is_an_error_naming_the_configuration():
    with pytest.raises(NoLearningRate) as err:
        choose_lr([pilot(1e-4, "FAILED"), pilot(3e-4, val_loss=math.nan)], label="rank=8")
    message = str(err.value)
    assert message.startswith("[rank=8] no learning rate could be chosen: all 2 pilots of lr_grid 0.0001,0.0003")
    assert "diverged" in message and "boom" in message and "\n" not in message


# --- the grid -----------------------------------------------------------------------------------------------------


def test_a_list_is_every_method_s_grid_and_a_mapping_is_per_method():
    plain = parse_lr_grid([1.0e-4, "2e-4", 1.0e-4])  # YAML reads 2e-4 (no dot) as text; repeats once
    assert plain.grids == {ANY_METHOD: (1e-4, 2e-4)}
    assert plain.for_method("lora") == plain.for_method("full") == (1e-4, 2e-4)
    by_method = parse_lr_grid({"lora": [1e-4, 1e-3], "full": [1e-5]}, 20)
    assert by_method.for_method("lora") == (1e-4, 1e-3) and by_method.for_method("full") == (1e-5,)
    assert by_method.steps(config(max_steps=100)) == 20
    assert parse_lr_grid({"lora": [1e-4]}).for_method("full") is None
    assert parse_lr_grid(None, 5) is None  # pilot_steps alone: no tuning
    assert LrGrid({ANY_METHOD: (1e-4,)}).steps(config(max_steps=100)) == 100  # default: as long as the main runs


@pytest.mark.parametrize(
    "grid, steps, message",
    [
        ([], None, "lr_grid=[] is invalid: a non-empty list of learning rates in (0, 1)"),
        ({}, None, "lr_grid={} is invalid: a non-empty list"),
        ([1e-4, 0], None, "lr_grid=[0.0001, 0] is invalid: a non-empty list of learning rates in (0, 1), or a "),
        ([-1e-4], None, "(-0.0001 is not)"),
        (["fast"], None, "lr_grid=['fast'] is invalid"),
        ([True], None, "(True is not)"),
        ([2.0], None, "(2.0 is not)"),
        (1e-4, None, "lr_grid=0.0001 is invalid"),
        ({"lora": []}, None, "lr_grid.lora=[] is invalid"),
        ({"qlora": [1e-4]}, None, "lr_grid.qlora=[0.0001] is invalid: a method is one of lora, full"),
        ([1e-4], 0, "pilot_steps=0 is invalid: an integer >= 1"),
        ([1e-4], 2.5, "pilot_steps=2.5 is invalid: an integer >= 1"),
        ([1e-4], "10", "pilot_steps='10' is invalid"),
    ],
)
def test_bad_grids_name_the_field_the_value_and_what_is_allowed(grid, steps, message):
    with pytest.raises(ConfigError) as err:
        parse_lr_grid(grid, steps)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_profile_wins_over_the_sweep_file_key_by_key():
    grid = lr_settings({"lr_grid": [1e-4], "pilot_steps": 5}, {"lr_grid": [2e-4, 4e-4]})
    assert grid.grids == {ANY_METHOD: (2e-4, 4e-4)} and grid.pilot_steps == 5
    assert lr_settings({"lr_grid": [1e-4]}, {"pilot_steps": 7}).pilot_steps == 7
    assert lr_settings({}, {}) is None


# --- pilots and groups --------------------------------------------------------------------------------------------


def test_a_pilot_trains_short_at_its_rate_and_never_shares_a_main_run_s_key():
    main = config(max_steps=40, generate_samples=10)
    p = pilot_config(main, 1e-3, 10)
    assert (p.lr, p.max_steps, p.eval_every, p.generate_samples) == (1e-3, 10, 10, 0)
    assert pilot_key(p, "fp") != sweep_key(p, "fp")
    same = pilot_config(main, main.lr, main.max_steps)  # a pilot exactly like the main run of the first seed
    assert pilot_key(same, "fp") != sweep_key(main.replace(generate_samples=0), "fp")


def test_a_pilot_at_a_pilot_seed_trains_at_that_seed_and_keeps_its_key_otherwise():
    main = config(max_steps=40, seed=0)
    assert pilot_config(main, 1e-3, 10, 1000).seed == 1000
    assert pilot_key(pilot_config(main, 1e-3, 10), "fp") == pilot_key(pilot_config(main, 1e-3, 10, None), "fp")
    assert pilot_key(pilot_config(main, 1e-3, 10, 1000), "fp") != pilot_key(pilot_config(main, 1e-3, 10), "fp")


def test_pilots_train_at_pilot_seed_outside_the_main_seeds(tmp_path):
    """A pilot at a main seed trains that seed's batches: its main run would repeat the run that chose its rate."""
    sweep = load_sweep(sweep_file(tmp_path, lr_grid=[1e-4, 3e-4], pilot_seed=1000))
    assert sweep.lr_grid.pilot_seed == 1000 and sweep.pilots == 2 * 2
    assert load_sweep(sweep_file(tmp_path, lr_grid=[1e-4])).lr_grid.pilot_seed is None  # default: the first seed
    with pytest.raises(ConfigError, match=r"pilot_seed=1 is invalid: a seed outside the main seeds \[0, 1\]"):
        load_sweep(sweep_file(tmp_path, lr_grid=[1e-4], pilot_seed=1))
    with pytest.raises(ConfigError, match=r"pilot_seed=-3 is invalid: an integer from 0 to 2\^32-1"):
        load_sweep(sweep_file(tmp_path, lr_grid=[1e-4], pilot_seed=-3))
    assert lr_settings({"lr_grid": [1e-4], "pilot_seed": 7}, {"pilot_seed": 1000}).pilot_seed == 1000  # profile wins


def test_the_lr_group_leaves_out_the_rate_and_the_seed_only():
    base = config()
    assert group_id(base, "fp") == group_id(base.replace(lr=1e-3, seed=5), "fp")
    assert group_id(base, "fp") != group_id(base.replace(rank=8), "fp")
    assert group_id(base, "fp") != group_id(base, "other data")


def test_tags_of_pilots_and_main_runs():
    assert pilot_tags("g", "rank=8") == {"sweep_role": "pilot", "lr_group": "g", "lr_group_label": "rank=8"}
    untuned = main_tags("g", "rank=8", None)
    assert untuned == {"sweep_role": "main", "lr_group": "g", "lr_group_label": "rank=8", "lr_tuned": "false"}
    tuned = main_tags("g", "rank=8", choose_lr([pilot(1e-4, eval_loss=2.0), pilot(1e-3, eval_loss=1.0)]))
    assert tuned["lr_tuned"] == "true" and tuned["lr_chosen_from"] == "0.0001,0.001"
    assert tuned["lr_selected_by"] == "eval/loss"


# --- sweep files --------------------------------------------------------------------------------------------------


def sweep_file(tmp_path, **spec) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "axes": {"rank": [4, 8]}, "seeds": [0, 1], **spec}))
    return str(path)


def test_a_sweep_file_with_a_grid_counts_its_pilots(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, lr_grid=[1e-4, 3e-4, 1e-3], pilot_steps=5))
    assert sweep.lr_grid.pilot_steps == 5 and sweep.pilots == 3 * 2  # 3 rates x 2 configurations
    assert [c.name for c in sweep.first_seed_children()] == ["rank=4,seed=0", "rank=8,seed=0"]
    assert load_sweep(sweep_file(tmp_path)).pilots == 0
    assert (sweep.axes, load_sweep(sweep_file(tmp_path)).axes) == ("lr,rank", "rank")  # tuned: lr varies too
    by_method = sweep_file(tmp_path, lr_grid={"lora": [1e-4]}, base={"method": "full", "quantization": "bf16"})
    with pytest.raises(ConfigError, match=r"has no grid for method='full'"):
        load_sweep(by_method)
    with pytest.raises(ConfigError, match=r"lr is set by the configuration and lr_grid chooses it"):
        load_sweep(sweep_file(tmp_path, lr_grid=[1e-4], axes={"lr": [1e-4, 2e-4]}))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"lr_grid": []}, "lr_grid=[] is invalid: a non-empty list of learning rates in (0, 1)"),
        ({"lr_grid": [1e-4, -1]}, "lr_grid=[0.0001, -1] is invalid"),
        ({"lr_grid": ["x"]}, "lr_grid=['x'] is invalid"),
        ({"lr_grid": [1e-4], "pilot_steps": 0}, "pilot_steps=0 is invalid: an integer >= 1"),
        ({"lr_grid": [1e-4], "lr_grid_extend": -1}, "lr_grid_extend=-1 is invalid: an integer from 0 to 5"),
        ({"lr_grid": [1e-4], "lr_grid_extend": "two"}, "lr_grid_extend='two' is invalid: an integer from 0 to 5"),
        ({"lr_grid": [1e-4], "lr_grid_extend": True}, "lr_grid_extend=True is invalid"),
        ({"lr_grid": [1e-4], "lr_grid_extend": 6}, "lr_grid_extend=6 is invalid"),
    ],
)
def test_bad_grids_in_a_sweep_file_exit_2_before_any_run(spec, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sweep_entry.main, ["--config", sweep_file(tmp_path, **spec)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "mlflow.db").exists()  # no store opened: no run, let alone a RUNNING one


# --- past the grid's edge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pilots, expected",
    [
        ([pilot(1e-3, val_loss=2.0), pilot(3e-3, val_loss=1.5)], 9e-3),  # best at the top: one step (x3) above
        ([pilot(1e-3, val_loss=1.0), pilot(3e-3, val_loss=1.5), pilot(1e-2, val_loss=1.9)], 3.3e-4),  # bottom: / 3
        ([pilot(1e-3, val_loss=2.0), pilot(3e-3, val_loss=1.5), pilot(1e-2, val_loss=1.9)], None),  # inside
        ([pilot(1e-3, val_loss=2.0), pilot(3e-3, val_loss=1.5), pilot(1e-2, val_loss=math.nan)], None),  # diverged
        ([pilot(1e-3, val_loss=2.0), pilot(3e-3, val_loss=1.5), pilot(1e-2, status="FAILED")], None),  # failed
        ([pilot(3e-3, val_loss=1.5)], None),  # one rate: no step size, no direction
        ([pilot(0.1, val_loss=2.0), pilot(0.5, val_loss=1.0)], None),  # 2.5 is no learning rate
    ],
)
def test_one_more_rate_past_the_edge_only_when_the_best_is_on_it(pilots, expected):
    found = beyond_edge(choose_lr(pilots))
    assert found == expected if expected is None else found == pytest.approx(expected)


def test_a_sweep_extends_the_grid_until_its_choice_is_inside(sqlite_tracking, tmp_path, monkeypatch):
    """The sweep's pilot phase with a backend that logs a known val/loss per rate (lowest at 2.7e-2): from the grid
    1e-3, 3e-3 it adds 9e-3, then 2.7e-2, then 8.1e-2 (worse: 2.7e-2 is inside), and stops though 5 were allowed.
    The main run trains at 2.7e-2, tagged with every rate tried; rank 8, best at its lower edge, tries 3.3e-4 below."""
    import mlflow

    from lora_efficiency import sweep as sweep_mod
    from lora_efficiency.children import Outcome

    client = mlflow.MlflowClient(sqlite_tracking)
    experiment_id = client.create_experiment("extend")
    loss = {1e-3: 3.0, 3e-3: 2.0, 9e-3: 1.5, 2.7e-2: 1.2, 8.1e-2: 1.4}  # rank 4
    loss_rank8 = {3.3e-4: 2.5, 1e-3: 1.0, 3e-3: 2.0}  # rank 8: best at its lower edge, 3.3e-4 worse
    tried = []

    def fake_runs(jobs):
        for job in jobs:
            settings = load_yaml(job.settings)["train"]
            lr, rank = float(settings["optimization"]["lr"]), int(settings["adapter"]["rank"])
            tried.append((rank, lr, job.tags.get("sweep_role")))
            run = client.create_run(experiment_id, tags=job.tags)
            client.log_param(run.info.run_id, "lr", str(lr))
            client.log_metric(run.info.run_id, "val/loss", (loss if rank == 4 else loss_rank8).get(lr, 0.5))
            client.set_terminated(run.info.run_id, "FINISHED")
            yield job, Outcome(run.info.run_id, 0, "", 0.1)

    monkeypatch.setattr(sweep_mod, "_backend", lambda *args: fake_runs)
    monkeypatch.setattr(sweep_mod, "predicted_peaks", lambda *args: {})
    sweep = load_sweep(sweep_file(tmp_path, lr_grid=[1e-3, 3e-3], lr_grid_extend=5, seeds=[0]))
    parent = client.create_run(experiment_id)
    lines = []
    result = sweep_mod.run_sweep(
        sweep, parent_run_id=parent.info.run_id, data_fingerprint="fp", data_path="", log=lines.append
    )
    pilots4 = [lr for rank, lr, role in tried if rank == 4 and role == "pilot"]
    assert pilots4 == pytest.approx([1e-3, 3e-3, 9e-3, 2.7e-2, 8.1e-2])
    assert [lr for rank, lr, role in tried if rank == 8 and role == "pilot"] == pytest.approx([1e-3, 3e-3, 3.3e-4])
    mains = {rank: lr for rank, lr, role in tried if role == "main"}
    assert mains == pytest.approx({4: 2.7e-2, 8: 1e-3})
    assert (result.total, result.pilots, result.finished, result.failed) == (10, 8, 10, 0)
    main4 = client.search_runs([experiment_id], "tags.sweep_role = 'main' and params.lr = '0.027'")[0]
    assert main4.data.tags["lr_chosen_from"] == "0.001,0.003,0.009,0.027,0.081"
    assert sum("is the edge of what was tried" in line for line in lines) == 4, lines


# --- the report's section -----------------------------------------------------------------------------------------


def run_data(run_id: str, *, lr: float, steps: int = 40, status: str = "FINISHED", tags=None, **metrics) -> RunData:
    params = {"lr": str(lr), "max_steps": str(steps)}
    metrics = {k.replace("_", "/"): v for k, v in metrics.items()}
    return RunData(run_id, run_id, status, 0, params, metrics, dict(tags or {}))


def report_of(runs, pilots, curves=None):
    return SimpleNamespace(scope=Scope("toy", None, runs, [], [], [], [], pilots), loss_curves=curves or {})


def test_the_section_says_plainly_when_one_learning_rate_served_every_configuration():
    blocks = lr_section(report_of([run_data("a", lr=2e-4), run_data("b", lr=2e-4, tags={"lr_tuned": "false"})], []))
    assert blocks[0] == ("h2", "Learning rates")
    (kind, text) = blocks[1]
    assert (
        kind == "p" and "all configurations trained at one learning rate (0.0002); a configuration that moves" in text
    )
    assert "(what this can confound: the modules and rank comparisons)" in text


def test_the_section_tables_each_group_s_pilots_and_marks_the_chosen_rate():
    main_tags_ = {
        "lr_tuned": "true",
        "lr_group": "g1",
        "lr_group_label": "rank=8",
        "lr_chosen_from": "0.0001,0.001,0.01",
        "lr_selected_by": "val/loss",
    }
    mains = [run_data(f"m{s}", lr=1e-3, tags=main_tags_) for s in range(2)]
    pilot = {"sweep_role": "pilot", "lr_group": "g1", "lr_group_label": "rank=8"}
    pilots = [
        run_data("p1", lr=1e-4, steps=10, tags=pilot, val_loss=2.5),
        run_data("p2", lr=1e-3, steps=10, tags=pilot, val_loss=2.1),
        run_data("p3", lr=1e-2, steps=10, status="FAILED", tags={**pilot, "error": "training diverged at step 3"}),
        run_data("x", lr=1e-3, tags={"sweep_role": "pilot", "lr_group": "other"}),  # another scope: root None = all
    ]
    curves = {"p2": [(i, 3.0 - i * 0.1) for i in range(1, 11)]}
    blocks = lr_section(report_of(mains, pilots, curves))
    table = next(b for b in blocks if b[0] == "table")
    rows = {(r[0], r[1]): r for r in table[2]}
    assert rows["rank=8", "0.001"][3] == "2.1000" and rows["rank=8", "0.001"][5] == "chosen (lowest val/loss)"
    assert rows["rank=8", "0.001"][4].startswith("2.900 (step 1) -> ") and rows["rank=8", "0.001"][4].endswith(
        "(step 10)"
    )
    assert rows["rank=8", "0.0001"][5] == "" and rows["rank=8", "0.01"][2].startswith("FAILED: training diverged")
    notes = next(b for b in blocks if b[0] == "ul")[1]
    assert any("pilots of 10 steps chose the rate of main runs of 40 steps" in n for n in notes)
    assert not any(b[0] == "p" and "one learning rate" in b[1] for b in blocks)  # every run was tuned


def test_pilots_of_the_scope_are_its_sweeps_children_and_its_groups():
    root = run_data("root", lr=1e-4)
    sweep = run_data("sweep", lr=1e-4)
    main = run_data("m", lr=1e-4, tags={"lr_group": "g"})
    mine = run_data("p1", lr=1e-4, tags={"sweep_role": "pilot", "mlflow.parentRunId": "sweep"})
    reused = run_data("p2", lr=1e-4, tags={"sweep_role": "pilot", "mlflow.parentRunId": "old", "lr_group": "g"})
    other = run_data("p3", lr=1e-4, tags={"sweep_role": "pilot", "mlflow.parentRunId": "old", "lr_group": "h"})
    scope = Scope("toy", root, [main], [], [], [sweep], [], [mine, reused, other])
    assert [p.run_id for p in pilots_in_scope(scope)] == ["p1", "p2"]


def test_the_standard_profile_asks_rank_and_modules_with_declared_contrasts_and_pilots_off_the_main_seeds():
    from lora_efficiency.study import profile_sweeps, study_contrasts
    from lora_efficiency.sweep import load_sweep

    assert profile_sweeps("standard") == "configs/sweeps/standard.yaml"
    sweep = load_sweep(profile_sweeps("standard"), profile="standard")
    configs = [c.config for c in sweep.children]
    assert sorted({c.seed for c in configs}) == list(range(6))  # the power the profile's comments compute
    assert {(c.method, c.rank, c.target_modules, c.quantization) for c in configs} == {
        ("lora", 16, "all_linear", "bf16"),
        ("lora", 4, "all_linear", "bf16"),
        ("lora", 16, "attention", "bf16"),
    }
    assert all(c.dropout == 0.0 and c.alpha == 32.0 for c in configs)
    assert all(c.eval_every and c.max_steps % c.eval_every == 0 and c.eval_every <= c.max_steps / 2 for c in configs)
    assert sweep.pilots == 3 * 3 and sweep.lr_grid.extend == 0  # a fixed number of pilots: the budget holds
    assert sweep.lr_grid.pilot_seed not in sweep.seeds  # no main run is the pilot that chose its rate
    assert all(sweep.lr_grid.steps(c) == c.max_steps for c in configs)  # pilots as long as the main runs
    assert len(sweep.children) + sweep.pilots == 27  # the runs the profile's arithmetic counts (27 x ~257 s)
    contrasts = study_contrasts("standard", [sweep])  # each side is a configuration the study trains
    assert [(c.test, c.margin) for c in contrasts] == [("equivalence", 0.02), ("difference", 0.05)]


def test_every_profile_names_its_sweeps():
    from lora_efficiency.study import profile_sweeps
    from lora_efficiency.sweep import load_sweep

    three = ["configs/sweeps/rank.yaml", "configs/sweeps/modules.yaml", "configs/sweeps/quantization.yaml"]
    assert profile_sweeps("quick").split(",") == three
    assert profile_sweeps("full").split(",") == ["configs/sweeps/reference.yaml", *three]
    for name in ("reference", "rank", "modules", "quantization"):  # every sweep of the full profile loads
        sweep = load_sweep(f"configs/sweeps/{name}.yaml", profile="full")
        assert sweep.lr_grid is not None and all(c.config.eval_every == 50 for c in sweep.children)
        assert sweep.lr_grid.pilot_seed not in sweep.seeds


def test_main_runs_go_seed_by_seed_across_configurations(tmp_path):
    """Seed 0 of every configuration, then seed 1 of every one: a slow stretch of the machine lands on one seed of
    each configuration (which pairing by seed cancels), not on all seeds of one."""
    from lora_efficiency import sweep as S

    sweep = load_sweep(sweep_file(tmp_path, axes={"rank": [4, 8, 16]}, seeds=[0, 1, 2]))
    assert [c.name for c in sweep.children][:3] == ["rank=4,seed=0", "rank=4,seed=1", "rank=4,seed=2"]  # as expanded
    submitted = []
    phase = SimpleNamespace(
        sweep=sweep, fingerprint="fp", revision=lambda config: "", submit=lambda todo: submitted.extend(todo)
    )
    S._run_main(phase, {})
    assert [child.name for child, _, _ in submitted] == [f"rank={r},seed={s}" for s in (0, 1, 2) for r in (4, 8, 16)]


def test_a_contrast_that_names_no_configuration_of_the_study_is_an_error(tmp_path, monkeypatch):
    from lora_efficiency import study

    sweep = load_sweep(sweep_file(tmp_path))  # rank 4 and 8
    ok = {"name": "r", "a": {"rank": 4}, "b": {"rank": 8, "alpha": 32}, "test": "equivalence", "margin": 0.02}
    monkeypatch.setattr(study, "load_profile", lambda profile: {"contrasts": [ok]})
    assert [c.name for c in study.study_contrasts("toy", [sweep])] == ["r"]  # alpha: 32 is the 32.0 of the runs
    monkeypatch.setattr(study, "load_profile", lambda profile: {"contrasts": [{**ok, "b": {"rank": 5}}]})
    with pytest.raises(ConfigError, match=r"contrasts\[0\]\.b=\{'rank': '5'\} is invalid"):
        study.study_contrasts("toy", [sweep])


def test_presets_that_resolve_to_the_same_modules_train_once_under_the_broadest_name(tmp_path):
    """On a Llama-style model attention_mlp and all_linear both adapt q, k, v, o, gate, up and down: the sweep keeps
    all_linear (its keys unchanged) and says which names it stands for; the model is read from its config alone
    (a folder with config.json and no weights)."""
    from lora_efficiency.sweep import ALIASES_TAG, parent_tags
    from tests.conftest import tiny_llama_config

    model = tmp_path / "llama-config-only"
    tiny_llama_config(512).save_pretrained(model)
    spec = {"base": {"model": str(model)}, "axes": {"target_modules": ["attention_mlp", "all_linear", "attention"]}}
    sweep = load_sweep(sweep_file(tmp_path, **spec))
    assert [c.name for c in sweep.children] == [
        "target_modules=all_linear,seed=0",
        "target_modules=all_linear,seed=1",
        "target_modules=attention,seed=0",
        "target_modules=attention,seed=1",
    ]
    assert sweep.aliases == {"all_linear": ["attention_mlp"]}
    alone = config(model=str(model), target_modules="all_linear", seed=0)
    assert sweep_key(sweep.children[0].config, "fp") == sweep_key(alone, "fp")  # the identity of the same child
    tags = parent_tags(sweep, profile="", data_fingerprint="fp", backend="local")
    assert json.loads(tags[ALIASES_TAG]) == {"all_linear": ["attention_mlp"]}
    assert sweep.alias_lines() == [
        "[s] target_modules attention_mlp adapt the same modules as all_linear on this model: trained once, as "
        "all_linear"
    ]
    explicit = sweep_file(tmp_path, base={"model": str(model)}, axes={"target_modules": ["q_proj,v_proj", "q_v"]})
    assert [c.config.target_modules for c in load_sweep(explicit).children] == ["q_v", "q_v"]  # a preset first


def test_the_section_says_when_a_pilot_trained_at_a_seed_its_main_runs_are_scored_on():
    tuned = {"lr_tuned": "true", "lr_group": "g", "lr_group_label": "rank=8", "lr_chosen_from": "0.001,0.003"}
    mains = [run_data(f"m{s}", lr=1e-3, tags={**tuned, "seed": str(s)}) for s in range(2)]

    def notes_with_pilots_at(seed: int) -> list[str]:
        pilot = {"sweep_role": "pilot", "lr_group": "g", "lr_group_label": "rank=8", "seed": str(seed)}
        pilots = [run_data(f"p{lr}", lr=lr, tags=pilot, val_loss=v) for lr, v in ((1e-3, 2.0), (3e-3, 2.1))]
        return next((b[1] for b in lr_section(report_of(mains, pilots)) if b[0] == "ul"), [])

    assert any("its pilots trained at seed 0, which its main runs are scored on" in n for n in notes_with_pilots_at(0))
    assert not any("scored on" in n for n in notes_with_pilots_at(1000))  # pilot_seed outside the main seeds
