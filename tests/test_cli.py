"""The command line's settings options: help and defaults from config.py, and `histoembed config`."""

from __future__ import annotations

import tomllib

import pytest
import typer
from rich.markup import escape

from histoembed.cli import app
from histoembed.cli.app import STAGE_TABLES, setting_help
from histoembed.core import config as cfg

COMMANDS = typer.main.get_command(app).commands


def setting_paths(stage: str) -> dict[str, str]:
    """{parameter name: settings path} for every field of ``stage``'s table, sub-tables as ``mlp_hidden``."""
    paths = {}
    for name, field in type(getattr(cfg.Settings(), stage)).model_fields.items():
        if isinstance(field.default, cfg.BaseModel):
            for sub in type(field.default).model_fields:
                paths[f"{name}_{sub}"] = f"{stage}.{name}.{sub}"
        else:
            paths[name] = f"{stage}.{name}"
    return paths


# Options whose parameter is not named after their setting (the setting's name is long or clumsy on a command line).
RENAMED = {"fit": {"mixup": "fit.mlp.mixup_alpha", "xgb_rounds": "fit.xgb.n_estimators",
                   "pca_dims": "fit.xgb.pca_dims"}}


@pytest.mark.parametrize("stage", list(STAGE_TABLES))
def test_setting_options_take_help_and_default_from_config(stage):
    paths = {**setting_paths(stage), **RENAMED.get(stage, {})}
    options = [p for p in COMMANDS[stage].params if p.name in paths]
    assert len(options) >= 6
    for p in options:
        field, _ = cfg.field_at(paths[p.name])
        assert p.help == escape(setting_help(paths[p.name])), p.name
        default = "not set" if field.default is None else cfg.toml_value(field.default)
        assert setting_help(paths[p.name]).endswith(f"{field.description} [default: {default}]")
        assert p.default is None  # not given: histoembed.toml still applies


def test_no_option_writes_a_default_by_hand():
    for name, command in COMMANDS.items():
        for p in command.params:
            assert "(default" not in (getattr(p, "help", None) or ""), f"{name} --{p.name}: {p.help}"


def test_help_shows_the_settings_defaults(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option
    out = cli("crops", "--help").output
    assert "[default: 10]" in out and "[default: [124, 116, 104]]" in out and "roi-window" in out


def test_help_lists_the_stages_in_pipeline_order_then_the_tools(cli, monkeypatch):
    """Issue 36: `histoembed --help` showed the verbs alphabetically; now two panels, stages in run order."""
    from histoembed.stages import PIPELINE

    monkeypatch.setenv("COLUMNS", "300")  # one line per command
    out = cli("--help").output
    panels: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("╭─"):
            panel = panels.setdefault(line.strip("╭─╮ "), [])
        elif line.startswith("│ ") and line[2:3].isalpha():
            panel.append(line[2:].split()[0])
    assert list(panels) == ["Options", "Stages", "Tools"]
    assert tuple(panels["Stages"]) == PIPELINE == ("qc", "crops", "embed", "fit", "submit", "report", "predict", "drift")
    assert panels["Tools"] == ["synth", "demo", "compare", "export", "import", "config", "encoders"]
    assert list(COMMANDS) == panels["Stages"] + panels["Tools"]  # every command, each in one panel


def test_config_prints_every_setting_as_toml(cli, tmp_path):
    res = cli("config", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert cfg.Settings.model_validate(tomllib.loads(res.stdout)) == cfg.Settings()


def test_config_of_a_stage_resolves_file_then_options(cli, tmp_path):
    (tmp_path / cfg.CONFIG_FILE).write_text("[crops]\nsize = 64\nk = 3\n[fit.mlp]\nhidden = 16\n")
    res = cli("config", "crops", "--k", "5", "--strategy", "grid", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    unset = {k for k, v in cfg.CropSettings().model_dump().items() if v is None}  # TOML has no null: left out
    assert tomllib.loads(res.stdout) == {"crops": {**cfg.CropSettings().model_dump(mode="json", exclude=unset),
                                                   "size": 64, "k": 5, "strategy": "grid"}}
    assert not (tmp_path / "run").exists()  # nothing ran
    fit = tomllib.loads(cli("config", "fit", "--mlp-epochs", "7", "--xgb-rounds", "9", cwd=tmp_path).stdout)["fit"]
    assert (fit["mlp"]["hidden"], fit["mlp"]["epochs"], fit["xgb"]["n_estimators"]) == (16, 7, 9)
    embed = tomllib.loads(cli("config", "embed", "--pool", "mean", cwd=tmp_path).stdout)
    assert set(embed) == {"embed", "augment"} and embed["embed"]["pool"] == "mean"
    # What `config` prints is a settings file the stage reads back as it is.
    saved = tmp_path / "saved.toml"
    saved.write_text(res.stdout)
    again = cli("config", "crops", "--config", saved, cwd=tmp_path / "..")
    assert tomllib.loads(again.stdout) == tomllib.loads(res.stdout)


def test_config_rejects_bad_stages_and_values(cli, tmp_path):
    res = cli("config", "submit", cwd=tmp_path)
    assert res.exit_code == 2 and "has no settings" in res.output
    res = cli("config", "crops", "--k", "0", cwd=tmp_path)
    assert res.exit_code == 2 and "--k" in res.output


# ---------------------------------------------------------------- the settings file's bytes (issue 23, 4b, 6b)

def test_a_settings_file_in_utf16_or_with_a_bom_is_read_and_other_bytes_are_a_message(cli, tmp_path):
    text = "[crops]\nsize = 64\n"
    for encoded in (text.encode("utf-16"),                       # PowerShell's `histoembed config > file`
                    b"\xfe\xff" + text.encode("utf-16-be"),
                    text.encode("utf-8-sig")):                   # Out-File -Encoding utf8
        (tmp_path / cfg.CONFIG_FILE).write_bytes(encoded)
        res = cli("config", "crops", cwd=tmp_path)
        assert res.exit_code == 0, res.output
        assert tomllib.loads(res.stdout)["crops"]["size"] == 64
    (tmp_path / cfg.CONFIG_FILE).write_bytes(b"[crops]\nsize = 64 # caf\xe9\n")   # Latin-1, no BOM
    for args in ((), ("--config", tmp_path / cfg.CONFIG_FILE)):
        res = cli("config", *args, cwd=tmp_path)
        text_out = " ".join(res.output.split())
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert cfg.CONFIG_FILE in text_out and "UTF-8" in text_out


def test_a_dangling_settings_link_is_a_message_not_the_defaults(cli, tmp_path):
    (tmp_path / cfg.CONFIG_FILE).symlink_to(tmp_path / "moved-away.toml")
    res = cli("config", "crops", cwd=tmp_path)
    text_out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert cfg.CONFIG_FILE in text_out and "moved-away.toml" in text_out and "does not exist" in text_out
    res = cli("config", "--config", tmp_path / cfg.CONFIG_FILE, cwd=tmp_path)
    assert res.exit_code == 2 and "missing file" in " ".join(res.output.split())


def test_the_docs_name_only_options_their_stages_have():
    """README and docs/ spans like `fit --folds` (and `histoembed ...` lines in its code blocks) name real options;
    `--keep` (qc, crops) is never offered beside `fit`, which has none (issue 23, 6c)."""
    import re
    from pathlib import Path

    options = {name: {o for p in c.params for o in (*p.opts, *p.secondary_opts)} for name, c in COMMANDS.items()}
    root = Path(__file__).parents[1]
    text = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", prose)
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        spans += [line.split("#")[0] for line in block.splitlines() if line.strip().startswith("histoembed ")]
    wrong = []
    for span in spans:
        words = span.split()
        words = words[1:] if words[:1] == ["histoembed"] else words
        words = words[1:] if words[:1] == ["config"] else words       # `config STAGE OPTIONS` passes them on
        if words and words[0] in COMMANDS:
            wrong += [f"{words[0]} {w}" for w in words[1:] if w.startswith("--") and w.split("=")[0]
                      not in options[words[0]]]
    assert not wrong, wrong
    for sentence in re.split(r"(?<=[.;])\s+", prose):
        if "`fit`" in sentence and re.search(r"`--keep[ `]", sentence):
            raise AssertionError(f"`--keep` beside `fit`, which has no such option: {' '.join(sentence.split())}")
