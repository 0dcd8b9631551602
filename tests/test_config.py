"""Configuration: YAML + overrides, validated before any work, errors as one line naming the key."""

from __future__ import annotations

import pytest
import yaml

from launch import cli, config
from models.base.configlib import ConfigError, parse_override


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.zero_stage=5", "config key 'train.zero_stage': expected one of 0, 1, 2, 3, got 5"),
        ("train.nproc=0", "config key 'train.nproc': expected auto or a number >= 1, got 0"),
        ("train.nproc=many", "config key 'train.nproc': expected an integer or one of 'auto', got 'many'"),
        ("train.batch_size=-4", "config key 'train.batch_size': expected a number >= 1, got -4"),
        ("train.batch_size=abc", "config key 'train.batch_size': expected an integer, got 'abc'"),
        ("train.batch_size=2.5", "config key 'train.batch_size': expected an integer, got 2.5"),
        ("train.optim.lr=0", "config key 'train.optim.lr': expected a number > 0, got 0"),
        ("train.precision=fp8", "config key 'train.precision': expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ("ingest.shard_size=0", "config key 'ingest.shard_size': expected a number >= 1, got 0"),
        ("prior.text_drop=1.5", "config key 'prior.text_drop': expected a number <= 1, got 1.5"),
        ("embed.columns=[clip_image_emb,nope]", "config key 'embed.columns': unknown column 'nope'"),
        ("sample.sampler=euler", "config key 'sample.sampler': expected one of 'ddim', 'ddpm', 'unclip', got 'euler'"),
        ("ldm.block_channels=[12]", "config key 'ldm.block_channels': expected multiples of 8"),
        ("train.optim.betas=[0.9]", "config key 'train.optim.betas': expected two numbers in [0, 1)"),
    ],
)
def test_impossible_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_unknown_key_names_it_and_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"config key 'train.bach_size': unknown key \(known keys here: .*batch_size"):
        config.load(None, ["train.bach_size=3"])
    with pytest.raises(ConfigError, match=r"config key 'trian': unknown key"):
        config.load(None, ["trian.steps=3"])


def test_yaml_then_overrides_then_validation(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"root": str(tmp_path / "data"), "train": {"steps": 7, "batch_size": 4}}))
    cfg = config.load(str(path), ["train.batch_size=8", "ldm.block_channels=[32, 64]"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.ldm.block_channels) == (7, 8, [32, 64])
    # {root} in any string setting follows root
    assert cfg.encoders.vae.path == str(tmp_path / "data" / "encoders" / "vae")
    assert cfg.store_url == str(tmp_path / "data" / "store")


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=f"config file '{bad}': not valid YAML"):
        config.load(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "missing.yaml"))
    wrong = tmp_path / "list.yaml"
    wrong.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        config.load(str(wrong))
    nested = tmp_path / "nested.yaml"
    nested.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="config key 'train': expected a mapping, got 3"):
        config.load(str(nested))


def test_override_syntax():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("root=s3://bucket/x=y") == (["root"], "s3://bucket/x=y")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="expected a dotted key"):
        parse_override("train..steps=3")
    # YAML 1.1 reads 1e-4 as a string; a float setting still takes it
    assert config.load(None, ["train.optim.lr=1e-4", "encoders.fit.vae_lr=2E+0"]).train.optim.lr == 1e-4
    with pytest.raises(ConfigError, match="'train.optim.lr': expected a number, got '1e-4x'"):
        config.load(None, ["train.optim.lr=1e-4x"])


def test_saved_config_round_trips(tmp_path):
    from models.base.configlib import read_yaml, to_yaml

    cfg = config.load(
        None, [f"root={tmp_path}", "train.steps=11", "train.deepspeed={zero_optimization: {overlap_comm: true}}"]
    )
    (tmp_path / "saved.yaml").write_text(to_yaml(cfg))
    again = config.from_dict(read_yaml(str(tmp_path / "saved.yaml")))
    assert again == cfg


def test_cli_stops_before_work_with_one_line(tmp_path, capsys):
    code = cli.main(["ingest", f"root={tmp_path}", "ingest.shard_size=-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "unclip ingest: error: config key 'ingest.shard_size': expected a number >= 1, got -1"
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_cli_rejects_unknown_stage_and_stray_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "decoderx"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["embed", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_cli_reports_missing_inputs_without_traceback(tmp_path, capsys):
    assert cli.main(["ingest", f"root={tmp_path}", f"ingest.url_list={tmp_path}/nope.parquet"]) == 2
    assert capsys.readouterr().err.strip() == f"unclip ingest: error: URL list '{tmp_path}/nope.parquet': not found"
    assert cli.main(["train", "ldm", f"root={tmp_path}"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_every_shipped_config_is_valid():
    from pathlib import Path

    shipped = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        config.load(str(path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.offload_params=cpu"],
            "config key 'train.offload_params': parameter offload needs train.zero_stage=3, got 2",
        ),
        (
            ["train.zero_stage=0", "train.offload_optimizer=cpu"],
            "config key 'train.offload_optimizer': optimizer offload needs train.zero_stage of 1, 2 or 3",
        ),
        (
            ["train.zero_stage=3", "train.offload_params=nvme"],
            "config key 'train.nvme_path': offload to nvme needs a local NVMe folder",
        ),
        (
            ["train.deepspeed={train_micro_batch_size_per_gpu: 4}"],
            "config key 'train.deepspeed.train_micro_batch_size_per_gpu': set train.batch_size instead",
        ),
        (
            ["train.deepspeed={optimizer: {type: Adam}}"],
            "config key 'train.deepspeed.optimizer': set train.optim instead",
        ),
        (
            ["train.deepspeed={bf16: {enabled: true}}"],
            "config key 'train.deepspeed.bf16.enabled': contradicts train.precision=fp32",
        ),
        (
            ["train.deepspeed={zero_optimization: {stage: 3}}"],
            "config key 'train.deepspeed.zero_optimization.stage': contradicts train.zero_stage=2",
        ),
    ],
)
def test_invalid_deepspeed_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    assert str(err.value).startswith(message)


def test_deepspeed_config_is_derived_and_raw_keys_pass_through():
    from training.ds_config import deepspeed_config

    cfg = config.load(
        None,
        [
            "train.zero_stage=3",
            "train.offload_params=cpu",
            "train.offload_optimizer=cpu",
            "train.precision=bf16",
            "train.grad_accum=4",
            "train.grad_clip=0.5",
            "train.deepspeed={zero_optimization: {overlap_comm: true}}",
        ],
    )
    ds = deepspeed_config(cfg.train)
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
        "overlap_comm": True,
    }
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False and ds["fp16"]["loss_scale"] == 0
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"], ds["train_micro_batch_size_per_gpu"]) == (
        4,
        0.5,
        32,
    )
    assert "gradient_clipping" not in deepspeed_config(config.load(None, ["train.grad_clip=0"]).train)


class _Accelerator:
    """Stands in for DeepSpeed's accelerator's answers only: whether this machine's CPU (or GPU)
    supports a precision depends on the machine (DeepSpeed's CPU accelerator says yes to fp16 on a
    CPU with avx512_fp16), so the test sets the answer and checks what check_runtime does with it."""

    def __init__(self, fp16: bool, bf16: bool) -> None:
        self.fp16, self.bf16 = fp16, bf16

    def is_fp16_supported(self) -> bool:
        return self.fp16

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def device_name(self) -> str:
        return "cpu"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_precision_the_accelerator_lacks_is_refused_before_launch_and_accepted_where_it_has_it(
    precision, monkeypatch
):
    import deepspeed

    from training.ds_config import check_runtime

    train = config.load(None, [f"train.precision={precision}"]).train
    monkeypatch.setattr(deepspeed, "get_accelerator", lambda: _Accelerator(fp16=False, bf16=False))
    with pytest.raises(
        ConfigError, match=f"config key 'train.precision': {precision} is not supported by DeepSpeed's cpu"
    ):
        check_runtime(train)
    monkeypatch.setattr(deepspeed, "get_accelerator", lambda: _Accelerator(fp16=True, bf16=True))
    check_runtime(train)  # accepted: nothing raised


def test_lr_schedule():
    from training.ds_config import lr_factor

    optim = config.load(None, ["train.optim.warmup_steps=10", "train.optim.min_lr_ratio=0.1"]).train.optim
    f = lr_factor(optim, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    constant = lr_factor(
        config.load(None, ["train.optim.schedule=constant", "train.optim.warmup_steps=0"]).train.optim, 100
    )
    assert constant(0) == constant(99) == 1.0


def test_a_sections_own_default_is_kept_and_overrides_merge_over_it():
    """A stage's DiffusionConfig default (prior: x0 prediction) survives loading and a partial override."""
    cfg = config.load(None, [])
    assert cfg.prior.diffusion.prediction == "x0" and cfg.ldm.diffusion.loss_weighting == "min_snr"
    cfg = config.load(None, ["prior.diffusion.timesteps=500", "launch.env.A=1"])
    assert (cfg.prior.diffusion.prediction, cfg.prior.diffusion.timesteps) == ("x0", 500)
    assert cfg.launch.env == {"A": "1"}  # a dict value replaces its default whole


def test_per_stage_train_settings_replace_single_values(tmp_path):
    """`train.stages.<stage>` changes only the keys it gives, over the train section, for that stage;
    a bad value is refused when the config is read, naming the key."""
    from launch.demo import DEMO_STAGE_TRAIN, with_demo_training

    path = tmp_path / "stages.yaml"
    path.write_text(
        "train:\n  steps: 50\n  optim: {warmup_steps: 5}\n  stages:\n    ldm: {steps: 9, optim: {lr: 2.0e-3}}\n"
    )
    cfg = config.load(str(path))
    ldm, prior = config.for_stage(cfg, "ldm").train, config.for_stage(cfg, "prior").train
    assert (ldm.steps, ldm.optim.lr, ldm.optim.warmup_steps, ldm.stages) == (9, 2e-3, 5, {})
    assert (prior.steps, prior.optim.lr) == (50, cfg.train.optim.lr)
    assert config.for_stage(config.for_stage(cfg, "ldm"), "ldm") == config.for_stage(cfg, "ldm")
    with pytest.raises(
        ConfigError, match=r"^config key 'train.stages.dit': expected a stage \(prior, decoder, upsampler, ldm\)$"
    ):
        config.load(None, ["train.stages.dit.steps=3"])
    with pytest.raises(
        ConfigError,
        match=r"^config key 'train.batch_size': expected a number >= 1, got 0 \(with train.stages.ldm applied\)$",
    ):
        config.load(None, ["train.stages.ldm.batch_size=0"])
    with pytest.raises(ConfigError, match=r"train.offload_params.*\(with train.stages.ldm applied\)"):
        config.load(None, ["train.stages.ldm.offload_params=cpu"])  # checked against the stage's whole settings
    assert with_demo_training(config.load(None)).train.stages == DEMO_STAGE_TRAIN
    assert with_demo_training(cfg).train.stages == cfg.train.stages  # given ones replace the demo's whole


def test_each_chain_samples_at_its_own_models_scales():
    """The ldm has no prior (its prior scale is 1); unCLIP guides its decoder and prior separately."""
    cfg = config.load(None, ["sample.guidance=4", "sample.decoder_guidance=2.5", "sample.prior_guidance=1.5"])
    assert cfg.sample.scales("ldm") == (4.0, 1.0)
    assert cfg.sample.scales("unclip") == (2.5, 1.5)
    with pytest.raises(ValueError, match="sample chain 'decoder': expected ldm or unclip"):
        cfg.sample.scales("decoder")


def test_the_docs_name_only_real_config_keys():
    """Every `section.key` named by the READMEs, every file under docs/, the config files' comments and the code's
    strings (error messages, option docs) exists, so a renamed or mistyped option leaves no stale advice
    (keys under a free-form mapping, launch.env.*, are any; `ray.data` is a module, not a key)."""
    import ast
    import dataclasses
    import importlib.util
    import re
    import typing
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    keys, free = set(), set()

    def walk(cls, prefix: str) -> None:
        for field in dataclasses.fields(cls):
            path, tp = f"{prefix}{field.name}", typing.get_type_hints(cls)[field.name]
            keys.add(path)
            if dataclasses.is_dataclass(tp):
                walk(tp, path + ".")
            elif typing.get_origin(tp) is dict:
                free.add(path + ".")

    walk(config.Config, "")
    sections = sorted(
        f.name
        for f in dataclasses.fields(config.Config)
        if dataclasses.is_dataclass(typing.get_type_hints(config.Config)[f.name])
    )
    named = re.compile(rf"(?<![\w/.-])((?:{'|'.join(sections)})\.[A-Za-z_][A-Za-z0-9_.]*)")  # not inside a path

    def texts(path: Path) -> list[str]:
        if path.suffix != ".py":
            return [path.read_text()]
        return [
            n.value
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]

    def module(name: str) -> bool:
        try:
            return importlib.util.find_spec(".".join(name.split(".")[:2])) is not None
        except ModuleNotFoundError:
            return False

    guides = sorted(p for p in (repo / "docs").rglob("*") if p.is_file())
    assert {"README.md", "operators.md", "data.md", "training.md"} <= {p.name for p in guides}
    documents = [
        repo / "README.md",
        repo / "infra" / "README.md",
        *guides,
        *sorted((repo / "configs").glob("*.yaml")),
        *sorted(
            p for d in ("data_pipeline", "training", "models", "launch", "benchmarks") for p in (repo / d).rglob("*.py")
        ),
    ]
    stale = []
    for document in documents:
        for text in texts(document):
            for match in named.finditer(text):
                key = match.group(1).rstrip(".")
                if (
                    key.endswith((".py", ".json", ".yaml", ".md", ".png", ".sbatch"))
                    or key in keys
                    or key.startswith(tuple(free))
                    or module(key)
                ):
                    continue
                stale.append(f"{document.relative_to(repo)}: {key}")
    assert not stale, stale
    assert "train.ema.on_cpu" in keys and "launch.env." in free  # the walk itself


def test_the_readme_is_a_front_page_and_the_docs_links_resolve():
    """README.md starts with the two commands and stays within 200 lines; the rest lives in docs/, and every
    relative link of README.md and docs/ names a file of the repository and, with an anchor, one of its headings."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 200, len(lines)
    assert lines[2] == "```" and lines[3].startswith("make demo ") and lines[4].startswith("make test ")
    assert "`.ci/run`" in readme and "`make lint`" in readme

    def anchors(path: Path) -> set[str]:
        headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}

    broken = []
    for document in [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", document.read_text()):
            if "://" in target:
                continue
            path = (document.parent / target).resolve() if target else document
            if not path.is_file() or (anchor and anchor not in anchors(path)):
                broken.append(f"{document.relative_to(repo)}: {target}#{anchor}")
    assert not broken, broken
    for name in ("README.md", "operators.md", "data.md", "training.md"):
        assert f"docs/{name}" in readme, name  # the README leads into each guide


def test_compile_under_zero3_is_refused_by_name():
    with pytest.raises(ConfigError, match="config key 'train.compile': not with train.zero_stage=3"):
        config.load(None, ["train.compile=blocks", "train.zero_stage=3"])
