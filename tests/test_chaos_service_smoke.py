"""A short version of the served chaos soak (bench/chaos/service_soak.py): a sample of its
malformed-request corpus, every family represented, sent to an in-process service; each
request gets the status code it must (UNKNOWN never does)."""

from __future__ import annotations

import tomllib

from bench.chaos.service_soak import TOKEN, budget_gib, check, corpus, sample
from driver.api.service import Service, messages
from driver.config.service import ServiceConfig


def test_malformed_requests_get_their_status_codes(tmp_path):
    (tmp_path / "data").mkdir()
    svc = Service(
        ServiceConfig(
            port=0,
            token=TOKEN,
            runs_dir=str(tmp_path / "runs"),
            data_roots=(str(tmp_path / "data"),),
            max_run_memory_gib=budget_gib(),
        )
    )
    cases = sample(corpus(seed=0, generated=60), 40, seed=0)
    try:
        result = check(f"127.0.0.1:{svc.port}", TOKEN, cases)
    finally:
        svc.stop()
    assert result["malformed_requests"] == 40
    assert len(result["families"]) >= 20  # bad TOML to bad tokens, fixed and generated
    assert result["wrong_status"] == 0, "\n".join(
        f"{w['request']}: expected {w['expected']}, got {w['got']} ({w['details'][:200]})"
        for w in result["wrong"]
    )


def test_each_config_case_is_refused_for_what_it_says():
    """Outside the families about TOML syntax and the wire, every StartRun case is valid TOML
    (a repeated key, say, would be refused as bad TOML whatever its value); only an integer
    past Python's 4,300 digits is read no further."""
    syntax = {"bad_toml", "deep", "gen_toml", "wire", "gen_utf8"}
    for case in corpus(seed=0, generated=150):
        if case.method != "StartRun" or case.family in syntax:
            continue
        text = messages.StartRunRequest.FromString(case.body).config_toml
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AssertionError(f"{case.summary}: not TOML ({exc})") from None
        except ValueError:
            assert "9" * 4301 in text, case.summary
