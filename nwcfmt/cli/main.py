"""``nwc``: encode, decode, inspect and verify NWC checkpoints.

Every failure on bad input prints one line (``nwc: error: ...``) and exits non-zero; no tracebacks.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from nwcfmt import __version__
from nwcfmt.codecs.registry import available_codecs
from nwcfmt.errors import InputError, NwcError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"2GiB"`` -> 2 * 2**30, ``"1000"`` -> 1000."""
    m = _SIZE.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 500MB, 5GB or 2GiB")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(unit or " "))


class BitsType(click.ParamType):
    """``--bits``: a positive number; integral values stay integers (the integer-code quantizers need them)."""

    name = "number"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return value
        try:
            number = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number", param, ctx)
        if not 0 < number < float("inf"):
            self.fail(f"{value!r} must be positive", param, ctx)
        return int(number) if number.is_integer() else number


def parse_params(items: tuple[str, ...]) -> dict:
    """``("bits=4", "profile=fast")`` -> ``{"bits": 4, "profile": "fast"}`` (values parsed as JSON when they can be)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"nwc: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn library and OS errors into one-line messages with a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NwcError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}")
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)

    return wrapper


@contextmanager
def progress_bar(total: int, desc: str, quiet: bool) -> Iterator[Callable[[str, int], None]]:
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=quiet, file=sys.stderr, leave=False) as bar:

        def update(name: str, nbytes: int) -> None:
            bar.set_postfix_str(name[-40:], refresh=False)
            bar.update(nbytes)

        yield update


class CodecChoice(click.Choice):
    """``--codec``: the registered codecs and calibrated methods, listed when the option is used (codec modules
    may register after this module is imported)."""

    def __init__(self) -> None:
        super().__init__([])

    @property
    def choices(self) -> list[str]:
        from nwcfmt.calibration import calibrated_methods

        return sorted({*available_codecs(), *calibrated_methods()})

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it
        pass


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nwc")
def cli() -> None:
    """nwc: compressed checkpoints for LLM weights (NWC format, safetensors-compatible)."""


def hub_options(fn: Callable) -> Callable:
    """``--endpoint`` and ``--token``, shared by the commands that talk to the Hugging Face Hub."""
    fn = click.option(
        "--token", default=None, help="Hub access token [$HF_TOKEN or the saved login]; needed for private repos."
    )(fn)
    return click.option(
        "--endpoint", default=None, metavar="URL", help="Hub endpoint [$HF_ENDPOINT or https://huggingface.co]."
    )(fn)


def plan_options(fn: Callable) -> Callable:
    """The planner's options, shared by ``encode --target-bpw`` and ``plan``."""
    fn = click.option(
        "--rerank",
        is_flag=True,
        default=False,
        help="Plan under three proxies (Fisher-scaled, half-scaled, Hessian alone) and keep the one with the lowest "
        "loss on held-out calibration text (KL to the model; 1 - cosine for encoders).",
    )(fn)
    fn = click.option(
        "--measurements",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        metavar="FILE",
        help="Keep the planner's measurements of the model in FILE and reuse them: the first run measures and "
        "writes it, later plans of the same model and options (another target) only solve.",
    )(fn)
    fn = click.option(
        "--no-sensitivity",
        is_flag=True,
        default=False,
        help="Plan on Hessian-weighted layer error alone (default: scaled by each tensor's measured Fisher "
        "sensitivity, of the next-token distribution or of an encoder's sentence embedding).",
    )(fn)
    fn = click.option(
        "--plan-codecs",
        default=None,
        metavar="LIST",
        help="Codecs the planner may choose, comma-separated, at most one calibrated (ecsq or gptq) "
        "[ecsq,rtn,lossless].",
    )(fn)
    fn = click.option(
        "--target-size",
        default=None,
        metavar="SIZE",
        help="Plan for weight files of at most SIZE (e.g. 60MB, 57MiB; headers included) instead of --target-bpw.",
    )(fn)
    return click.option(
        "--budget",
        type=click.Choice(["planned", "whole"]),
        default=None,
        help="--target-bpw counts the planned tensors (weights, embeddings, lm_head) or every tensor [planned].",
    )(fn)


@cli.command()
@click.argument("src")
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path), help="Output folder or file.")
@click.option(
    "--codec",
    type=CodecChoice(),
    default=None,
    help="Default codec [lossless]; neural and ecsq entropy-code latents at --bits; gptq, flexround, lrq calibrate.",
)
@click.option("--exclude", multiple=True, metavar="GLOB", help="Store tensors matching GLOB raw (repeatable).")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), help="JSON policy file (see docs).")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Codec parameter for the default codec (repeatable), e.g. profile=fast or chunk_elems=65536.",
)
@click.option(
    "--bits",
    type=BitsType(),
    default=None,
    help="Integer-code quantizers: bits per code (2-8); ecsq and neural: target bits per weight, a real number [4].",
)
@click.option(
    "--group-size", type=int, default=None, help="Quantizing codecs: values per scale (0 per channel, -1 per tensor)."
)
@click.option("--symmetric", is_flag=True, default=None, help="Quantizing codecs: symmetric codes (no zero point).")
@click.option("--clip-search", is_flag=True, default=None, help="rtn: search each group's clipping range.")
@click.option(
    "--max-shard-size",
    default=None,
    help="Shards of whole decoder blocks, at most this much source weight each (e.g. 5GB; 1 for one per block) [2GB].",
)
@click.option(
    "--ray",
    default=None,
    metavar="auto|ADDRESS",
    help="Data-free codecs: encode tensors as Ray tasks on this cluster (auto: the running one, or a local one).",
)
@click.option(
    "--calib",
    "calib_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibrated codecs: UTF-8 calibration text, or 'self' for text the model writes itself "
    "[the project's: State of the Union speeches before 2000].",
)
@click.option(
    "--calib-samples", type=click.IntRange(min=1), default=None, help="Calibrated codecs: token windows [128]."
)
@click.option(
    "--calib-seqlen", type=click.IntRange(min=2), default=None, help="Calibrated codecs: tokens per window [256]."
)
@click.option(
    "--calib-seed",
    type=click.IntRange(min=0),
    default=None,
    help="Calibrated codecs: seed of where the windows start in the text [0]; another seed, other windows.",
)
@click.option(
    "--prune",
    type=click.Choice(["magnitude", "random", "wanda", "sparsegpt"]),
    default=None,
    help="Store sparse tensors: prune by this method, then code the kept values with --codec (wanda and "
    "sparsegpt calibrate).",
)
@click.option(
    "--sparsity", type=click.FloatRange(0.0, 1.0, max_open=True), default=None, help="--prune: fraction pruned [0.5]."
)
@click.option(
    "--sparsity-pattern",
    default=None,
    metavar="unstructured|N:M",
    help="--prune: unstructured, or N kept in every M consecutive weights of a row, e.g. 2:4 [unstructured].",
)
@click.option(
    "--prune-scope",
    type=click.Choice(["layer", "global"]),
    default=None,
    help="--prune magnitude: rank weights per tensor, or over the whole model [layer].",
)
@click.option(
    "--reconstruct",
    is_flag=True,
    default=None,
    help="--prune: fine-tune the kept weights on each block's output (calibrated; kept only if held-out MSE falls).",
)
@click.option(
    "--target-bpw",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Plan the codec and setting of each tensor for this many bits per weight (file bytes), then encode.",
)
@plan_options
@click.option("--plan-out", type=click.Path(path_type=Path), default=None, help="Save the plan (a policy file).")
@click.option("--no-resume", is_flag=True, help="Discard the finished shards of an interrupted encode, start over.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--revision", default=None, help="Hub repo ids: the branch, tag or commit to download [main].")
@hub_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@handle_errors
def encode(src, dst, codec, exclude, policy_file, params, max_shard_size, ray, overwrite, quiet, **options) -> None:
    """Encode a Hugging Face model folder (or a .safetensors / .bin file, or a Hub repo id) into NWC.

    SRC is a local path or a Hub repo id (namespace/name), downloaded into the huggingface_hub cache and
    recorded as the base model in the output's quantization_config.

    Memory stays at about one tensor (data-free codecs) or one decoder block plus the calibration activations
    (calibrated codecs), whatever the model's size. Shards are written as they finish (in OUTPUT.nwc-partial/)
    and an interrupted encode resumes from them when the same command runs again; calibrated codecs also resume
    from the last finished block (OUTPUT.nwc-resume/).

    With --prune, the Linear weights are stored sparse: a mask (--sparsity, or an N:M --sparsity-pattern) and the
    kept values coded by --codec (nwc info shows each tensor's sparsity and mask bits); wanda, sparsegpt and
    --reconstruct calibrate.

    Calibrated codecs (gptq, flexround, lrq, ecsq, neural) run the model block by block on calibration text and
    print one line per block with an estimate of the time left. Under torchrun (gloo) the ranks share each
    block's Linears; with --ray, data-free codecs encode tensors as Ray tasks. The output is the same bits
    whatever the number of workers.

    With --target-bpw B, the planner (nwc plan) chooses each tensor's codec and setting for B bits per weight
    and the encode follows its plan: the records of the planned tensors (weights, embeddings, lm_head) hold at
    most B bits per weight, within 0.01 of it (--budget whole: of every tensor; headers are not counted). With
    --target-size SIZE the weight files, headers included, hold at most SIZE bytes. An interrupted encode plans
    again (the same plan) and resumes; --plan-out keeps the plan for --policy.
    """

    hub = {key: options.pop(key) for key in ("revision", "endpoint", "token")}
    no_resume = options.pop("no_resume")
    calib = {key: options.pop(key) for key in CALIB_KEYS}
    planning = {key: options.pop(key) for key in PLANNING_KEYS}
    _check_planning(planning, codec, policy_file, options, params, ray)
    sparse = {key: options.pop(key) for key in ("prune", "sparsity", "sparsity_pattern", "prune_scope", "reconstruct")}
    codec_params = {**{k: v for k, v in options.items() if v is not None}, **parse_params(params)}  # quantizer
    if sparse["prune"] is not None:
        codec, codec_params = "sparse", _sparse_params(codec, codec_params, sparse, policy_file)
    elif any(v is not None for v in sparse.values()):
        raise InputError("--sparsity, --sparsity-pattern, --prune-scope and --reconstruct need --prune")
    shard_bytes = parse_size(max_shard_size) if max_shard_size else None
    plan_file = None
    try:
        if _planning(planning):
            planning["shard_bytes"] = shard_bytes
            policy_file = plan_file = _plan_for_encode(src, dst, planning, calib, exclude, hub, quiet)
        if codec is None and policy_file is not None and sparse["prune"] is None:
            planned = _plan_codec(policy_file)  # a plan whose main codec calibrates: its rules calibrate
            if planned is not None:
                codec, codec_params = planned[0], {**planned[1], **codec_params}
        _encode_routed(
            src, dst, codec, codec_params, policy_file, exclude, shard_bytes, overwrite, quiet, hub, no_resume, calib,
            ray, planned_here=plan_file is not None,
        )  # fmt: skip
    finally:
        if plan_file is not None and planning["plan_out"] is None:
            plan_file.unlink(missing_ok=True)


CALIB_KEYS = ("calib_file", "calib_samples", "calib_seqlen", "calib_seed")  # encode's and plan's calibration options
PLANNING_KEYS = (  # encode's planner options: the two targets, then what only a plan uses
    "target_bpw",
    "target_size",
    "budget",
    "plan_codecs",
    "no_sensitivity",
    "rerank",
    "plan_out",
    "measurements",
)


def _check_planning(planning: dict, codec, policy_file, options: dict, params, ray) -> None:
    """One-line errors for planner options without --target-bpw, and for what --target-bpw decides itself."""
    from nwcfmt.distributed.torch_backend import launched_by_torchrun

    if not _planning(planning):
        if any(planning[k] for k in PLANNING_KEYS[2:]):  # the options that only matter to a plan
            raise InputError(
                "--budget, --plan-codecs, --no-sensitivity, --rerank, --plan-out and --measurements need --target-bpw "
                "or --target-size"
            )
        return
    given = [k for k, v in (("--codec", codec), ("--policy", policy_file)) if v is not None]
    given += [f"--{k.replace('_', '-')}" for k in ("prune", "bits", "group_size", "symmetric", "clip_search")
              if options.get(k) is not None]  # fmt: skip
    given += ["--param"] if params else []
    given += ["--ray"] if ray else []
    if given:
        raise InputError(f"the planner chooses the codecs itself: drop {', '.join(given)}")
    if launched_by_torchrun():
        raise InputError("plan once with 'nwc plan --target-bpw B -o plan.json', then run 'nwc encode --policy "
                         "plan.json' under torchrun")  # fmt: skip


def _encode_routed(
    src, dst, codec, codec_params, policy_file, exclude, shard_bytes, overwrite, quiet, hub, no_resume, calib, ray,
    planned_here: bool,
) -> None:  # fmt: skip
    """Encode with the calibrated pipeline when ``codec`` calibrates (and can here), else data-free."""
    from nwcfmt.calibration import get_method
    from nwcfmt.distributed import INLINE, open_executor

    factory = get_method(codec) if codec else None
    if codec == "sparse" and not _sparse_codec(codec_params).calibrated:
        factory = None
    if factory is None and any(v is not None for v in calib.values()) and not planned_here:
        raise InputError("--calib, --calib-samples, --calib-seqlen and --calib-seed apply to calibrated codecs only")
    if factory is not None and getattr(get_codec_class(codec), "calibration_optional", False):
        factory = _optional_calibration(src, codec, codec_params, factory, quiet)
    if factory is not None and ray:
        if not getattr(get_codec_class(codec), "calibration_optional", False):
            raise InputError(f"--ray runs data-free codecs; {codec} is calibrated: run it under torchrun instead")
        if not quiet:
            click.echo(
                f"nwc: --ray: encoding {codec} data-free (calibrate=false); calibrated runs use torchrun", err=True
            )
        codec_params["calibrate"], factory = False, None
    executor = open_executor(ray)
    try:
        if factory is not None:
            _encode_calibrated(
                src,
                dst,
                factory,
                codec,
                codec_params,
                policy_file,
                exclude,
                shard_bytes,
                overwrite,
                quiet or not executor.is_main,
                hub,
                executor,
                no_resume=no_resume,
                **calib,
            )
        elif executor.is_main:  # under torchrun, rank 0 encodes data-free codecs (use --ray to spread them)
            _encode_data_free(
                src,
                dst,
                codec,
                codec_params,
                policy_file,
                exclude,
                shard_bytes,
                overwrite,
                quiet,
                hub,
                no_resume,
                executor if ray else INLINE,
            )
    finally:
        executor.close()


def _plan_codec(policy_file: Path) -> tuple[str, dict] | None:
    """(main codec, its params) of a plan file (``nwc plan -o``) whose main codec calibrates, else None: a plan's
    rules are meant to be calibrated, each at its own setting. Other policy files keep their old meaning."""
    from nwcfmt.calibration import calibrated_methods

    try:
        doc = json.loads(Path(policy_file).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{policy_file}: cannot read policy file ({exc})") from None
    if not isinstance(doc, dict) or "plan" not in doc or doc.get("codec") not in calibrated_methods():
        return None
    return doc["codec"], dict(doc.get("params") or {})


def _calib_options(calib: dict):
    """The calibration options of ``--calib``, ``--calib-samples``, ``--calib-seqlen`` and ``--calib-seed``."""
    from nwcfmt.calibration.data import DEFAULT_SAMPLES, DEFAULT_SEQLEN, read_text_file
    from nwcfmt.calibration.pipeline import CalibOptions

    generate = calib["calib_file"] is not None and str(calib["calib_file"]) == "self"
    text = read_text_file(calib["calib_file"]) if calib["calib_file"] and not generate else None
    name = "self-generated" if generate else Path(calib["calib_file"]).name if calib["calib_file"] else None
    return CalibOptions(
        text=text,
        generate=generate,
        text_name=name or CalibOptions.text_name,
        samples=calib["calib_samples"] or DEFAULT_SAMPLES,
        seqlen=calib["calib_seqlen"] or DEFAULT_SEQLEN,
        seed=calib["calib_seed"] or 0,
    )


def _planning(planning: dict) -> bool:
    """Whether the options ask for a plan; one-line errors for a contradicting pair."""
    if planning["target_bpw"] is not None and planning["target_size"] is not None:
        raise InputError("give --target-bpw or --target-size, not both")
    if planning["target_size"] is not None and planning["budget"] is not None:
        raise InputError("--target-size counts the whole files: drop --budget")
    if isinstance(planning["target_size"], str):
        try:
            planning["target_size"] = parse_size(planning["target_size"])
        except click.BadParameter as exc:
            raise InputError(f"--target-size: {exc.message}") from None
        if planning["target_size"] <= 0:
            raise InputError("--target-size must be a positive size")
    return planning["target_bpw"] is not None or planning["target_size"] is not None


def _make_plan(src: Path, planning: dict, calib: dict, exclude, quiet: bool):
    """Measure the model's candidates and solve for ``--target-bpw`` or ``--target-size`` (``nwc plan`` and
    ``encode``)."""
    from nwcfmt.calibration.model import calibration_unavailable
    from nwcfmt.planner import DEFAULT_FAMILIES, make_plan, options
    from nwcfmt.planner.plan import rerank
    from nwcfmt.planner.store import measure_once

    reason = calibration_unavailable(src)
    if reason is not None:
        raise InputError(f"the planner runs the model on calibration text: {reason}")
    options_ = _calib_options(calib)
    if options_.generate:
        raise InputError("the planner measures on the calibration text; --calib self is not supported with it")
    if planning["rerank"] and planning["no_sensitivity"]:
        raise InputError("--rerank compares proxies scaled by the sensitivity: drop --no-sensitivity")
    families = tuple(f.strip() for f in planning["plan_codecs"].split(",")) if planning["plan_codecs"] else None
    choices = options(families or DEFAULT_FAMILIES)
    say = None if quiet else (lambda line: click.echo(f"plan: {line}", err=True))
    size = planning["target_size"]
    shards = _shard_count(src, planning.get("shard_bytes")) if size is not None else 1
    target_bpw, budget = planning["target_bpw"], planning["budget"] or "planned"
    sensitivity = not planning["no_sensitivity"]
    measured = measure_once(planning["measurements"], src, choices, options_, list(exclude), sensitivity, say)
    if planning["rerank"]:
        return rerank(src, measured, target_bpw, budget, options_, size, shards)
    return make_plan(measured, target_bpw, budget, size, shards)


def _shard_count(src: Path, shard_bytes: int | None) -> int:
    """The weight files ``encode`` writes for ``src`` (shards of whole blocks), one header allowance each."""
    from nwcfmt.convert import plan_shards
    from nwcfmt.sources import WeightSource

    return len(plan_shards(WeightSource.open(src), shard_bytes))


def _plan_for_encode(src, dst: Path, planning: dict, calib: dict, exclude, hub: dict, quiet: bool) -> Path:
    """Plan ``src`` for ``encode --target-bpw`` and write the plan as a policy file (``--plan-out``, or a file
    beside the output removed after the encode)."""
    from nwcfmt.hub import resolve_source

    local = Path(resolve_source(src, **hub, progress=not quiet))
    plan = _make_plan(local, planning, calib, exclude, quiet)
    if not quiet:
        mix = ", ".join(f"{k} {100 * v:.1f}%" for k, v in plan.mix().items())
        click.echo(
            f"plan: {plan.bits_per_weight:.4f} bits per weight over the {plan.budget} tensors, at most "
            f"{plan.file_bytes} bytes of weight files; mix of weights: {mix}",
            err=True,
        )
    path = planning["plan_out"] or Path(dst).absolute().with_name(f".{Path(dst).name}.nwc-plan.json")
    _write_text(path, plan.to_json())
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _sparse_params(codec: str | None, values: dict, sparse: dict, policy_file) -> dict:
    """The sparse codec's config for ``--prune``: the kept values coded by ``codec`` with its params."""
    if codec == "sparse":
        raise InputError("--prune makes sparse tensors itself: give --codec the codec of the kept values")
    if codec is None and policy_file:
        raise InputError("--prune with --policy: name the values codec with --codec")
    params = {
        "values_codec": codec or "lossless",
        "values": values,
        "prune": sparse["prune"],
        "sparsity": 0.5 if sparse["sparsity"] is None else sparse["sparsity"],
        "pattern": sparse["sparsity_pattern"] or "unstructured",
        "scope": sparse["prune_scope"] or "layer",
        "reconstruct": bool(sparse["reconstruct"]),
    }
    _sparse_codec(params)
    return params


def _sparse_codec(params: dict):
    from nwcfmt.codecs.sparse import SparseCodec

    try:
        return SparseCodec(**params)
    except TypeError as exc:
        raise InputError(f"--prune: invalid values codec params {params.get('values')} ({exc})") from None


def _global_threshold(policy, src: Path, quiet: bool) -> None:
    """``--prune-scope global``: the model-wide magnitude threshold, found by two passes over the tensors the
    policy prunes, written into the policy's sparse params."""
    from nwcfmt.encoders.prune import global_threshold
    from nwcfmt.sources import WeightSource

    source = WeightSource.open(src)
    names = [n for n in source.locations if policy.choose(n, source.get(n)).codec_id == "sparse"]
    found = global_threshold(lambda: (source.get(n) for n in names), policy.params["sparsity"])
    policy.params = {**policy.params, "threshold": found.threshold, "tie_fraction": found.tie_fraction}
    if not quiet:
        click.echo(
            f"nwc: global magnitude threshold {found.threshold:.6g} prunes {found.pruned} of {found.total} weights",
            err=True,
        )


def _encode_data_free(
    src, dst, codec, codec_params, policy_file, exclude, shard_bytes, overwrite, quiet, hub, no_resume, executor
) -> None:
    from nwcfmt.convert import encode_model, partial_dir
    from nwcfmt.hub import resolve_source
    from nwcfmt.policy import Policy
    from nwcfmt.sources import WeightSource

    overrides = {"codec": codec, "params": codec_params or None}
    policy = (
        Policy.from_file(policy_file, **overrides)
        if policy_file
        else Policy.from_dict({k: v for k, v in overrides.items() if v is not None})
    )
    policy.exclude = [*policy.exclude, *exclude]
    base_model = None if Path(src).exists() else src
    src = resolve_source(src, **hub, progress=not quiet)
    if codec == "sparse" and codec_params.get("scope") == "global":
        _global_threshold(policy, Path(src), quiet)
    total = WeightSource.open(src).total_bytes
    try:
        with progress_bar(total, "encode", quiet) as update:
            report = encode_model(
                src,
                dst,
                policy,
                max_shard_size=shard_bytes,
                overwrite=overwrite,
                progress=update,
                base_model=base_model,
                resume=not no_resume,
                executor=executor,
            )
    except KeyboardInterrupt:
        fail(
            f"interrupted; run the same command again to continue from the finished shards ({partial_dir(dst)})",
            EXIT_INTERRUPTED,
        )
    if not quiet:
        _encode_summary(report, dst)


def get_codec_class(codec_id: str | None):
    from nwcfmt.codecs.registry import get_codec

    return get_codec(codec_id) if codec_id in available_codecs() else None


def _optional_calibration(src, codec: str, codec_params: dict, factory, quiet: bool):
    """The calibrated encoder of a codec that can also encode data-free (ecsq, neural), or None when
    ``calibrate=false`` or when the local source cannot be calibrated (said on stderr)."""
    from nwcfmt.calibration.model import calibration_unavailable

    try:
        get_codec_class(codec)(**codec_params)  # bad params are an error before any notice
    except TypeError as exc:
        raise InputError(f"codec {codec!r}: invalid params {codec_params} ({exc})") from None
    if codec_params.get("calibrate") is False:
        return None
    reason = calibration_unavailable(Path(src)) if Path(src).exists() else None
    if reason is None:
        return factory
    if not quiet:
        click.echo(f"nwc: {reason}: encoding {codec} data-free (calibrate=false)", err=True)
    codec_params["calibrate"] = False
    return None


def _encode_summary(report, dst: Path) -> None:
    codecs = ", ".join(f"{k}: {v}" for k, v in sorted(report.codecs.items()))
    click.echo(
        f"encoded {report.tensors} tensors ({codecs}) {human(report.original_bytes)} -> "
        f"{human(report.stored_bytes)} ({report.ratio:.4f}x) in {report.seconds:.1f} s -> {dst}"
    )


def clock(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def block_line(event) -> str | None:
    """The progress line of a calibration event (None when nothing is worth a line)."""
    if event.stage == "prepare":
        return f"calibrating {event.total} blocks (inputs ready after {clock(event.elapsed)})"
    if event.stage == "write":
        return f"writing the output (calibration took {clock(event.elapsed)})"
    verb = "reloaded" if event.stage == "replay" else "quantized"
    eta = "?" if event.eta is None else clock(event.eta)
    keys = sorted({k for stats in event.stats.values() for k in stats})[:2]
    means = [f"{k} {sum(s.get(k, 0.0) for s in event.stats.values()) / len(event.stats):.4g}" for k in keys]
    extra = f", mean {', '.join(means)}" if means else ""
    return (
        f"block {event.done}/{event.total} {verb} in {event.block_seconds:.1f} s{extra}; "
        f"elapsed {clock(event.elapsed)}, remaining ~{eta}"
    )


def _encode_calibrated(
    src,
    dst,
    factory,
    codec,
    codec_params,
    policy_file,
    exclude,
    shard_bytes,
    overwrite,
    quiet,
    hub,
    executor,
    no_resume,
    **calib,
) -> None:
    from nwcfmt.calibration.pipeline import CalibrationStopped, encode_calibrated, resume_dir
    from nwcfmt.hub import resolve_source
    from nwcfmt.policy import Policy

    options = _calib_options(calib)
    try:
        quantizer = factory(dict(codec_params))
    except TypeError as exc:
        raise InputError(f"codec {codec!r}: invalid params {codec_params} ({exc})") from None
    codec_id = quantizer.codec.codec_id
    params = codec_params if codec_id == codec else quantizer.codec.get_config()
    overrides = {"codec": codec_id, "params": params or None}
    policy = Policy.from_file(policy_file, **overrides) if policy_file else Policy.from_dict(overrides)
    policy.exclude = [*policy.exclude, *exclude]
    base_model = None if Path(src).exists() else src
    src = resolve_source(src, **hub, progress=not quiet)

    def progress(event) -> None:
        line = None if quiet else block_line(event)
        if line:
            click.echo(line, err=True)

    try:
        report = encode_calibrated(
            src,
            dst,
            quantizer,
            calib=options,
            policy=policy,
            max_shard_size=shard_bytes,
            overwrite=overwrite,
            progress=progress,
            resume=not no_resume,
            base_model=base_model,
            executor=executor,
        )
    except (KeyboardInterrupt, CalibrationStopped):
        state = resume_dir(Path(dst))
        fail(
            f"interrupted; run the same command again to continue from the last finished block (state: {state})",
            EXIT_INTERRUPTED,
        )
    if not quiet and report is not None:
        _encode_summary(report, dst)


@cli.command()
@click.argument("src")
@click.option(
    "--target-bpw", type=click.FloatRange(min=0.0, min_open=True), default=None, help="Bits per weight to plan for."
)
@plan_options
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None, help="Write the plan here.")
@click.option(
    "--kl",
    is_flag=True,
    help="Also measure the plan end to end on held-out calibration text: KL to the model (causal LMs), or 1 - "
    "cosine of the sentence embeddings (encoders).",
)
@click.option("--exclude", multiple=True, metavar="GLOB", help="Keep tensors matching GLOB raw (repeatable).")
@click.option("--calib", "calib_file", type=click.Path(path_type=Path), default=None, help="Calibration text.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None, help="Calibration windows [128].")
@click.option("--calib-seqlen", type=click.IntRange(min=2), default=None, help="Tokens per window [256].")
@click.option(
    "--calib-seed", type=click.IntRange(min=0), default=None, help="Seed of where the windows start in the text [0]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (the policy file).")
@click.option("--revision", default=None, help="Hub repo ids: the branch, tag or commit to download [main].")
@hub_options
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@handle_errors
def plan(src, out, kl, exclude, as_json, quiet, **options) -> None:
    """Plan each tensor's codec and setting for --target-bpw bits per weight (or weight files of --target-size
    bytes), without writing weights.

    Every planned tensor (weights, embeddings, lm_head; norms and biases stay raw) is encoded with every candidate
    setting (ecsq rates, rtn/gptq bits, lossless) for its exact bytes and its error, weighted by the input
    Hessian (embeddings: by token counts) from calibration text and scaled by a measured Fisher sensitivity; the
    budget is spent by Lagrangian relaxation and a greedy fill. Prints one line per tensor with its choice, its
    bits and predicted error; -o writes the plan as a policy file for nwc encode --policy.
    """
    from nwcfmt.hub import resolve_source

    hub = {key: options.pop(key) for key in ("revision", "endpoint", "token")}
    calib = {key: options.pop(key) for key in CALIB_KEYS}
    if not _planning(options):
        raise InputError("nwc plan needs --target-bpw or --target-size")
    local = Path(resolve_source(src, **hub, progress=not quiet))
    result = _make_plan(local, options, calib, exclude, quiet)
    from nwcfmt.planner.check import HELDOUT_NOTES, plan_loss

    if kl and not any(key in result.notes for key, _ in HELDOUT_NOTES.values()):
        metric, values = plan_loss(local, [result], _calib_options(calib))
        result.notes[HELDOUT_NOTES[metric][0]] = values[0]
    if out is not None:
        _write_text(out, result.to_json())
    if as_json:
        click.echo(result.to_json())
    else:
        click.echo(result.table())
        for metric, (key, all_key) in HELDOUT_NOTES.items():
            what, unit = ("KL", " nats per token") if metric == "kl" else ("1 - cosine", "")
            for proxy, value in result.notes.get(all_key, {}).items():
                click.echo(f"held-out {what} of the {proxy} plan: {value:.5f}{unit}")
            if key in result.notes:
                click.echo(f"held-out {what} to the model: {result.notes[key]:.5f}{unit}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path), help="Output folder or file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--no-resume", is_flag=True, help="Discard the finished files of an interrupted decode, start over.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@handle_errors
def decode(src, dst, overwrite, no_resume, quiet) -> None:
    """Decode an NWC folder or file into plain safetensors (raw/lossless tensors come back bit for bit), one tensor
    at a time; an interrupted decode resumes from its finished files (OUTPUT.nwc-partial/)."""
    from nwcfmt.convert import decode_model
    from nwcfmt.summary import summarize

    total = summarize(src).original_bytes
    with progress_bar(total, "decode", quiet) as update:
        report = decode_model(src, dst, overwrite=overwrite, progress=update, resume=not no_resume)
    if not quiet:
        click.echo(
            f"decoded {report.tensors} tensors -> {human(report.original_bytes)} in {report.seconds:.1f} s -> {dst}"
        )


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def info(path, as_json) -> None:
    """Per-tensor table: codec, shape, original and stored bytes, effective bits per weight."""
    from nwcfmt.summary import summarize

    summary = summarize(path)
    doc = summary.to_json()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    rows = [
        (
            t.name,
            t.codec,
            t.dtype,
            "x".join(map(str, t.shape)) or "scalar",
            human(t.original_bytes),
            human(t.stored_bytes),
            f"{t.bits_per_weight:.3f}",
            t.note,
        )
        for t in summary.tensors
    ]
    head = ("tensor", "codec", "dtype", "shape", "original", "stored", "bits/w", "details")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    numeric = {4, 5, 6}
    for row in [head, *rows]:
        click.echo(
            "  ".join(
                str(c).rjust(w) if i in numeric else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    totals = doc["totals"]
    by_codec: dict[str, int] = {}
    for t in summary.tensors:
        by_codec[t.codec] = by_codec.get(t.codec, 0) + 1
    click.echo(
        f"\n{totals['tensors']} tensors ({', '.join(f'{k}: {v}' for k, v in sorted(by_codec.items()))}), "
        f"{totals['numel']:,} weights: {human(totals['original_bytes'])} -> {human(totals['stored_bytes'])} "
        f"({totals['ratio']:.4f}x), {totals['bits_per_weight']:.3f} bits/weight "
        f"({totals['encoded_bits_per_weight']:.3f} over the {totals['encoded_tensors']} encoded tensors); "
        f"files {human(totals['file_bytes'])} ({totals['file_bits_per_weight']:.3f} bits/weight with headers)"
    )


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="Print only failures.")
@handle_errors
def verify(path, quiet) -> None:
    """Check every checksum and decode every tensor; exit 1 naming the first bad tensor."""
    from nwcfmt.summary import summarize, verify

    summary = summarize(path) if not quiet else None
    total = summary.original_bytes if summary else 0
    with progress_bar(total, "verify", quiet) as update:
        failures = verify(path, progress=update)
    if failures:
        first = failures[0]
        for f in failures[1:]:
            click.echo(f"nwc: also bad: {f.tensor or f.file}: {f.error}", err=True)
        fail(f"{len(failures)} bad tensor(s); first: {first.tensor or first.file}: {first.error}")
    if not quiet:
        click.echo(f"ok: {len(summary.tensors)} tensors verified in {path}")


@cli.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--compare", is_flag=True, help="Evaluate every MODEL given and print one table (ratios vs the first).")
@click.option(
    "--text",
    "text_spec",
    default="sotu-eval",
    show_default=True,
    metavar="FILE|sotu-eval",
    help="UTF-8 text file, or the project's evaluation text (State of the Union speeches from 2000 on).",
)
@click.option("--windows", type=click.IntRange(min=1), default=8, show_default=True, help="Windows scored.")
@click.option("--seqlen", type=click.IntRange(min=2), default=2048, show_default=True, help="Tokens per window.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Windows per forward pass.")
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    default=None,
    help="Original model folder; required for encoders (scored by embedding cosine against it).",
)
@click.option("--sentences", type=click.IntRange(min=1), default=256, show_default=True, help="Encoders: sentences.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (a list with --compare).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG: metric vs bits/weight.")
@click.option("--no-save", is_flag=True, help="Do not record results in NWC folders' nwc_eval.json.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def eval_(
    models, compare, text_spec, windows, seqlen, batch, reference, sentences, as_json, plot_path, no_save, quiet
) -> None:
    """Perplexity (causal LMs) or embedding cosine vs --reference (encoders), with bits per weight.

    MODELS are plain Hugging Face folders or NWC folders. The protocol is fixed and documented in
    nwcfmt/eval/perplexity.py (default: first 8 windows of 2048 tokens, no BOS, fp32 on CPU). Results for an
    NWC folder are also recorded in <folder>/nwc_eval.json unless --no-save.
    """
    from tqdm import tqdm

    from nwcfmt.eval.loading import folder_kind
    from nwcfmt.eval.report import evaluate_folder, format_table, plot_records, resolve_text, save_eval_json

    if len(models) > 1 and not compare:
        raise InputError(f"{len(models)} models given: use --compare to evaluate several")
    kinds = [folder_kind(folder) for folder in models]  # fail fast, before any model is loaded
    if "encoder" in kinds and reference is None:
        encoder = models[kinds.index("encoder")]
        raise InputError(f"{encoder}: an encoder is scored by embedding cosine against its original: pass --reference")
    if reference is not None and "encoder" not in kinds:
        raise InputError("--reference is used only for encoders; compare causal LMs with --compare")
    text = resolve_text(text_spec)
    records = []
    for folder, kind in zip(models, kinds, strict=True):
        bars: list = []  # the bar starts with the first window, once the model is loaded

        def progress(done: int, bars: list = bars, folder: Path = folder) -> None:
            if not bars:
                bars.append(
                    tqdm(total=windows, desc=f"eval {folder.name}", unit="window", disable=quiet, file=sys.stderr)
                )
            bars[0].update(done - bars[0].n)

        try:
            record = evaluate_folder(
                folder,
                text=text,
                windows=windows,
                seqlen=seqlen,
                batch=batch,
                reference=reference,
                sentences=sentences,
                progress=progress if kind == "causal-lm" else None,
            )
        finally:
            for bar in bars:
                bar.close()
        if record.is_nwc and not no_save:
            try:
                record.extra["saved_to"] = str(save_eval_json(record))
            except OSError as exc:  # a read-only folder: the measurement itself is still reported
                click.echo(f"nwc: warning: cannot record results in {folder}: {exc.strerror or exc}", err=True)
        records.append(record)
    if plot_path is not None:
        plot_records(records, plot_path)
    if as_json:
        docs = [r.to_json() for r in records]
        click.echo(json.dumps(docs if compare else docs[0], indent=2))
        return
    if compare:
        click.echo(format_table(records))
    else:
        r = records[0]
        d = r.details
        if r.metric == "perplexity":
            what = (
                f"perplexity {r.value:.4f} on {r.text['name']}: {d['windows']} windows x {d['seqlen']} tokens "
                f"({d['tokens_scored']} scored)"
            )
        else:
            what = (
                f"mean cosine {r.value:.6f} (min {d['min_cosine']:.6f}) vs {r.reference} over {d['sentences']} "
                f"sentences of {r.text['name']}"
            )
        linear = "-" if r.bits_linear is None else f"{r.bits_linear:.3f}"
        click.echo(f"{r.folder} ({r.kind}{', NWC' if r.is_nwc else ''}): {what}")
        click.echo(f"bits/weight: {r.bits_all:.3f} all tensors, {linear} Linear weights")
        click.echo(f"time: load {r.load_seconds:.1f} s, eval {r.eval_seconds:.1f} s")
    for r in records:
        if "saved_to" in r.extra:
            click.echo(f"saved {r.extra['saved_to']}", err=True)
    if plot_path is not None:
        click.echo(f"plot: {plot_path}", err=True)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to, created from main when missing [main].")
@hub_options
@click.option("--base-model", default=None, metavar="ID", help="Base model for the card [recorded at encode time].")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@handle_errors
def push(folder, repo_id, private, revision, endpoint, token, base_model, message, quiet) -> None:
    """Upload an NWC FOLDER to the Hugging Face Hub as REPO_ID, with a generated model card.

    Files already on the Hub with the same content are skipped; when nothing changed, no commit is made.
    The card (README.md) is generated from the folder (codecs, sizes, bits per weight, nwc_eval.json) and
    uploaded without touching the folder.
    """
    from nwcfmt.hub import push_folder

    result = push_folder(
        folder,
        repo_id,
        private=private,
        revision=revision,
        endpoint=endpoint,
        token=token,
        commit_message=message,
        base_model=base_model,
        progress=not quiet,
    )
    if quiet:
        return
    if result.commit_url is None:
        click.echo(f"nothing changed: all {len(result.skipped)} files are already there; no commit")
    else:
        click.echo(
            f"uploaded {len(result.uploaded)} file(s), {human(result.uploaded_bytes)}: {', '.join(result.uploaded)}"
        )
        if result.skipped:
            click.echo(f"skipped {len(result.skipped)} unchanged file(s): {', '.join(result.skipped)}")
        if result.deleted:
            click.echo(f"deleted {len(result.deleted)} stale file(s): {', '.join(result.deleted)}")
        click.echo(f"commit: {result.commit_url}")
    click.echo(result.repo_url)


def main() -> None:
    cli(prog_name="nwc")


if __name__ == "__main__":
    main()
