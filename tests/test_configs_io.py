"""Shippable config files: export from the winners database, import into a fresh one,
lookup from the database and from a folder of files alone (CPU, fake evaluator)."""

import json
import warnings
from dataclasses import replace

import optuna
import pytest
from fake_backend import fake_environment
from fake_evaluator import FakeEvaluator

from flashmoe_gen.api import TuningFallbackWarning, lookup
from flashmoe_gen.configs_io import (
    FORMAT,
    ConfigFile,
    ConfigFileError,
    export_configs,
    import_configs,
)
from flashmoe_gen.db import list_winners, record_trial
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tuner.cli import main
from flashmoe_gen.tuner.space import SearchSpace
from flashmoe_gen.tuner.study import run_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
FAMILY = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=0)
COUNTS = (1, 8, 128)
ENV = fake_environment(2)


def _tune(db: str, counts=COUNTS, env=ENV, slower: float = 1.0) -> dict[int, tuple[str, float]]:
    """Tune each count with the fake evaluator, storing every trial like the tune command;
    returns count -> (winner config, latency)."""
    out = {}
    for t in counts:
        problem = FAMILY.replace(tokens_per_rank=t)
        space = SearchSpace.for_problem(problem, "sm_90", "small")
        fake = FakeEvaluator()

        def evaluate(cfg, fake=fake, t=t):
            o = fake(cfg)  # a count-dependent latency: each count has its own numbers
            return replace(o, median_ms=o.median_ms * (1 + t / 1000) * slower)

        def record(res, problem=problem, t=t):
            o = res.outcome
            record_trial(db, problem, env, res.config, status=o.status, median_ms=o.median_ms,
                         p20_ms=o.p20_ms, p80_ms=o.p80_ms, study_name=f"s{t}",
                         number=res.number)

        res = run_study(problem, evaluate, space=space, study_name=f"s{t}", n_trials=6,
                        sampler="random", seed=t, record=record)
        out[t] = (res.best.config.name, res.best.outcome.median_ms)
    return out


def test_tune_export_import_lookup_round_trip(tmp_path, monkeypatch):
    db, fresh = f"sqlite:///{tmp_path}/w.db", f"sqlite:///{tmp_path}/fresh.db"
    winners = _tune(db)
    (path,) = export_configs(db, tmp_path / "configs")
    d = json.loads(path.read_text())
    assert d["format"] == FORMAT and d["gpu"] == ENV.gpu_name and d["world_size"] == 2
    assert d["family"] == FAMILY.name and d["package_version"] and d["date"]
    assert path.name == "moe_h512_i2048_e8_k2_s1x2048_p2_bf16__fake_CPU_tests_fake_backend.py.json"
    assert {int(t): (e["config"], e["latency_ms"]) for t, e in d["configs"].items()} == winners

    r = import_configs(fresh, [tmp_path / "configs"])
    assert (r.recorded, r.skipped, r.files) == (3, 0, 1)
    assert import_configs(fresh, [path]).skipped == 3  # a second import records nothing
    assert len(list_winners(fresh)) == 3
    for t, (cfg, ms) in winners.items():
        k = lookup(FAMILY.replace(tokens_per_rank=t), device=ENV, db=fresh)
        assert (k.provenance, k.config.name, k.latency_ms, k.tuned_tokens) == (
            "exact", cfg, ms, t)

    # From the folder alone: no database is opened (the default one never appears).
    monkeypatch.setenv("FLASHMOE_DB", f"sqlite:///{tmp_path}/never.db")
    for t, (cfg, ms) in winners.items():
        k = lookup(FAMILY.replace(tokens_per_rank=t), device=ENV.gpu_name,
                   configs_dir=tmp_path / "configs")
        assert (k.provenance, k.config.name, k.latency_ms) == ("exact", cfg, ms)
        assert k.origin == str(path) and k.environment == ENV
    with pytest.warns(TuningFallbackWarning, match="using the one tuned for 8 tokens"):
        k = lookup(FAMILY.replace(tokens_per_rank=16), device=ENV.gpu_name,
                   configs_dir=tmp_path / "configs")
    assert (k.provenance, k.tuned_tokens, k.config.name) == ("nearest-tokens", 8, winners[8][0])
    with pytest.warns(TuningFallbackWarning, match="heuristic default"):  # another GPU
        assert lookup(FAMILY.replace(tokens_per_rank=8), device="NVIDIA H100 80GB HBM3",
                      configs_dir=tmp_path / "configs").provenance == "default"
    assert not (tmp_path / "never.db").exists()


def test_export_keeps_the_newest_environment_per_count(tmp_path):
    db = f"sqlite:///{tmp_path}/w.db"
    old = replace(ENV, package_version="0.0.9", template_hash="old")
    _tune(db, counts=(8, 128), env=old, slower=0.5)   # older versions, faster numbers
    new = _tune(db, counts=(128,))                      # re-tuned 128 with this version
    (f,) = [ConfigFile.read(p) for p in export_configs(db, tmp_path / "c")]
    assert f.environment == ENV and f.entries[128].environment is None
    assert f.entries[8].environment == old and (f.entries[128].config.name,
                                                f.entries[128].latency_ms) == new[128]
    fresh = f"sqlite:///{tmp_path}/fresh.db"
    import_configs(fresh, [tmp_path / "c"])
    assert {w.environment.template_hash for w in list_winners(fresh)} == {"old",
                                                                          ENV.template_hash}


def test_cli_export_import_and_show_from_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    db, fresh, out = f"sqlite:///{tmp_path}/w.db", f"sqlite:///{tmp_path}/f.db", tmp_path / "o"
    assert main(["export-configs", "--db", db, "-o", str(out)]) == 0
    assert "nothing written" in capsys.readouterr().out and not out.exists()
    winners = _tune(db)
    assert main(["export-configs", "--db", db, "-o", str(out), "--gpu", "other"]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert main(["export-configs", "--db", db, "-o", str(out), "--world-size", "2"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"wrote {out}/") and line.endswith(".json")
    assert main(["import-configs", str(out), "--db", fresh]) == 0
    assert capsys.readouterr().out.startswith("imported 3 config(s) from 1 file(s) into sqlite")
    flags = ["--hidden", "512", "--intermediate", "2048", "--experts", "8", "--top-k", "2",
             "--shared-experts", "1", "--world-size", "2", "--device", ENV.gpu_name]
    assert main(["show", *flags, "--tokens", "100", "--from-configs", str(out), "--json"]) == 0
    cap = capsys.readouterr()
    rep = json.loads(cap.out)
    assert (rep["provenance"], rep["tuned_tokens"], rep["config"]) == (
        "nearest-tokens", 128, winners[128][0])
    assert rep["origin"].endswith(".json") and "128 tokens" in cap.err
    assert main(["show", *flags, "--tokens", "8", "--db", fresh]) == 0
    out = " ".join(capsys.readouterr().out.split())  # a GPU name matches any version
    assert f"other-version (from {fresh}); config {winners[8][0]}" in out


def _valid_file() -> dict:
    return ConfigFile(FAMILY, ENV, {}).to_dict() | {"configs": {"8": {
        "config": "gu_bm64_bn64_bk64_w2x2_s3__dn_bm64_bn128_bk64_w2x4_s3__r8__c1__cs1__ss1",
        "latency_ms": 0.5}}}


@pytest.mark.parametrize("change, key, words", [
    (lambda d: d.update(format="vllm"), "format", "flashmoe_gen.configs/1"),
    (lambda d: d["problem"].update(experts=7), "problem", "divisible by world_size"),
    (lambda d: d.update(configs={"eight": d["configs"]["8"]}), "configs['eight']",
     "non-negative integers"),
    (lambda d: d["configs"]["8"].update(latency_ms=-1), "configs['8'].latency_ms",
     "positive finite"),
    (lambda d: d["configs"]["8"].update(config="gu_nonsense"), "configs['8'].config",
     "config"),
    (lambda d: d.update(configs={}), "configs", "no token count"),
    (lambda d: d.update(family="moe_h1_x"), "family", "does not match"),
    (lambda d: d["environment"].pop("gpu_name"), "environment", "gpu_name"),
])
def test_a_bad_file_names_the_key_and_imports_nothing(tmp_path, capsys, change, key, words):
    good, bad = tmp_path / "a_good.json", tmp_path / "b_bad.json"
    good.write_text(json.dumps(_valid_file()))
    d = _valid_file()
    change(d)
    bad.write_text(json.dumps(d))
    with pytest.raises(ConfigFileError, match=words) as e:
        ConfigFile.read(bad)
    assert e.value.key == key and str(bad) in str(e.value)
    db = f"sqlite:///{tmp_path}/w.db"
    assert main(["import-configs", str(tmp_path), "--db", db]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ConfigFileError" in err and key in err
    assert list_winners(db) == []  # the good file was not half-imported either


def test_a_config_that_does_not_fit_its_problem_is_refused_on_import(tmp_path):
    d = _valid_file()
    d["configs"]["8"]["config"] = d["configs"]["8"]["config"].replace("bn128", "bn256")
    d["problem"].update(hidden=128)
    d["family"] = d["family"].replace("h512", "h128")
    (tmp_path / "x.json").write_text(json.dumps(d))
    with pytest.raises(ConfigFileError, match=r"configs\['8'\].config"):
        import_configs(f"sqlite:///{tmp_path}/w.db", [tmp_path / "x.json"])


def test_lookup_skips_foreign_json_and_refuses_a_missing_folder(tmp_path):
    (tmp_path / "vllm.json").write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    (tmp_path / "ours.json").write_text(json.dumps(_valid_file()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k = lookup(FAMILY.replace(tokens_per_rank=8), device=ENV.gpu_name, configs_dir=tmp_path)
    assert k.provenance == "exact" and k.latency_ms == 0.5
    assert any("vllm.json: not a flashmoe_gen config file" in str(w.message) for w in caught)
    with pytest.raises(ConfigFileError, match="is not a folder"):
        lookup(FAMILY, device=ENV.gpu_name, configs_dir=tmp_path / "missing")
    from flashmoe_gen.errors import ArgumentError
    with pytest.raises(ArgumentError, match="configs_dir"):
        lookup(FAMILY, device=ENV.gpu_name, configs_dir=3)
