"""The MoE family census: every model type found by `discover.candidates()`, built tiny, run through
gmmquant's replace / save-load / calibrate, one row each.

    python -m tests.families.census                 # print the table (all families, with calibration)
    python -m tests.families.census --write-docs    # and regenerate the table in docs/RUNTIME.md

Columns: experts modules found; float replacement error (relative Frobenius error of the model output
against the original float model); w8a16 error (of the first experts module's output, on the tokens the
model routes to it); save -> from_pretrained round trip (identical output);
calibrate (`calibrate_model` with w8a16 on 4 x 32 tokens, the checkpoint loaded in the model's own class).
A family gmmquant refuses says why (gmmquant.runtime.families.UNSUPPORTED); a default config that cannot be
built tiny says so with transformers' error.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

FLOAT_TOL = 1e-4
W8A16_TOL = 0.02
CALIBRATE_TOL = 0.05
SEQ = 16


@dataclass
class Row:
    model_type: str
    model_class: str = ""
    experts: str = ""  # "2 x E=8 (model.layers.1.mlp.experts, ...)"
    float_error: Optional[float] = None
    w8a16_error: Optional[float] = None
    w8a16_logits_error: float = 0.0  # the whole model's (informative; see _calibrate)
    roundtrip: str = ""  # "identical" or the failure
    calibrate: str = ""  # "ok (err 0.012)", "not run", or the failure
    status: str = ""  # "supported", "refused", "cannot build tiny", "FAILED"
    note: str = ""
    seconds: float = 0.0
    failures: list = field(default_factory=list)

    @property
    def green(self) -> bool:
        return self.status in ("supported", "refused", "cannot build tiny") and not self.failures


def _output(model, inputs) -> torch.Tensor:
    torch.manual_seed(0)  # diffusion_gemma's forward samples its noise / masks
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t.float()
    return out[0].float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _first_module_error(model, quant, path: str, inputs: dict) -> float:
    """Relative error of the first quantized experts module against the original one, on the inputs the
    original model gives it (whole-model logits of some tiny random models move by several percent under
    any change of precision, bf16 included, so the model output does not measure the quantization)."""
    seen = {}
    hook = model.get_submodule(path).register_forward_pre_hook(
        lambda m, a, k: seen.setdefault("call", (a, k)), with_kwargs=True)
    try:
        _output(model, inputs)
    finally:
        hook.remove()
    args, kwargs = seen["call"]
    with torch.no_grad():
        ref = model.get_submodule(path)(*args, **kwargs)
        out = quant.get_submodule(path)(*args, **kwargs)
    return _rel(out.float(), ref.float())


def _inputs(config, seed: int = 0) -> dict:
    from gmmquant.runtime.families import is_seq2seq

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, SEQ), generator=g)  # token ids below every moved special token id
    return {"input_ids": ids, **({"decoder_input_ids": ids[:, :8]} if is_seq2seq(config) else {})}


def _short(exc: BaseException) -> str:
    cause = exc.__cause__  # config validators wrap the actual rule (StrictDataclassClassValidationError)
    text = f"{type(exc).__name__}: {exc}" if cause is None else f"{type(cause).__name__}: {cause}"
    return re.sub(r"\s+", " ", text).strip()[:200]


def tiny_config_of(model_type: str):
    from tiny import tiny_config

    return tiny_config(model_type)


def build(model_type: str, dtype=torch.float32):
    """(config, model class, model) of the tiny model; random weights with seed 0."""
    from tiny import tiny_config  # noqa: F401 (path set by the test package)
    from gmmquant.runtime.families import auto_model_class

    config = tiny_config(model_type)
    cls = auto_model_class(config)
    torch.manual_seed(0)
    model = cls._from_config(config, dtype=dtype).eval()
    return config, cls, model


def _check_refusal(model_type: str, row: Row) -> Row:
    """A refused family: calibration refuses its config, and replace_experts its model (when it builds)."""
    from gmmquant.calibrate.families import calibration_model_class
    from gmmquant.runtime.families import UNSUPPORTED, UnsupportedFamilyError
    from gmmquant import replace_experts

    row.status, row.note = "refused", UNSUPPORTED[model_type]
    refusals = []
    try:
        calibration_model_class(tiny_config_of(model_type))
    except UnsupportedFamilyError as exc:
        refusals.append(str(exc))
    try:
        _, cls, model = build(model_type)
        row.model_class = cls.__name__
    except Exception:
        model = None  # the refusal of the config is what is tested then
    if model is not None:
        try:
            replace_experts(model, "w8a16")
        except UnsupportedFamilyError as exc:
            refusals.append(str(exc))
    expected = 1 + (model is not None)
    if len(refusals) != expected or not all(UNSUPPORTED[model_type] in r for r in refusals):
        row.failures.append(f"refusal missing or without its reason: {refusals}")
    return row


def check_family(model_type: str, work: Path, calibrate: bool = True) -> Row:
    """One census row; never raises (failures are in row.failures)."""
    from gmmquant import NoExpertsError, replace_experts, save_model
    from gmmquant.pack.layouts import find_experts_modules
    from gmmquant.runtime.families import UNSUPPORTED, UnsupportedFamilyError

    row = Row(model_type)
    start = time.perf_counter()
    try:
        if model_type in UNSUPPORTED:
            return _check_refusal(model_type, row)
        try:
            config, cls, model = build(model_type)
            inputs = _inputs(config)
            reference = _output(model, inputs)
        except Exception as exc:  # transformers' own default config does not build or run when shrunk
            row.status, row.note = "cannot build tiny", _short(exc)
            return row
        row.model_class = cls.__name__
        from tiny import BUILD_AS

        if model_type in BUILD_AS:
            row.note = BUILD_AS[model_type][1]
        modules = find_experts_modules(model)
        if modules:
            first = next(iter(modules.values()))
            row.experts = f"{len(modules)} x E={first.num_experts}"
        floated = copy.deepcopy(model)
        replace_experts(floated, None)
        row.float_error = _rel(_output(floated, inputs), reference)
        if row.float_error > FLOAT_TOL:
            row.failures.append(f"float error {row.float_error:.2e} > {FLOAT_TOL}")
        del floated
        quant = copy.deepcopy(model)
        replace_experts(quant, "w8a16")
        q_out = _output(quant, inputs)
        row.w8a16_logits_error = _rel(q_out, reference)
        row.w8a16_error = _first_module_error(model, quant, next(iter(modules)), inputs)
        if row.w8a16_error > W8A16_TOL:
            row.failures.append(f"w8a16 error {row.w8a16_error:.2e} > {W8A16_TOL}")
        try:
            save_model(quant, work / "rtn")
            loaded = cls.from_pretrained(work / "rtn").eval()
            same = torch.equal(_output(loaded, inputs), q_out)
            row.roundtrip = "identical" if same else "differs"
            if not same:
                row.failures.append("round trip output differs")
        except Exception as exc:
            row.roundtrip = _short(exc)
            row.failures.append(f"round trip: {row.roundtrip}")
        del quant
        if calibrate:
            row.calibrate = _calibrate(model_type, model, reference, inputs, work, row)
        else:
            row.calibrate = "not run"
        row.status = "supported" if not row.failures else "FAILED"
    except NoExpertsError as exc:
        row.status, row.note = "FAILED", _short(exc)
        row.failures.append(row.note)
    except Exception as exc:
        row.status, row.note = "FAILED", _short(exc)
        row.failures.append(traceback.format_exc(limit=-4))
    finally:
        row.seconds = time.perf_counter() - start
    return row


_TOKENIZER = {}


def _tokenizer():
    from tiny_models import byte_level_tokenizer

    if "tok" not in _TOKENIZER:
        _TOKENIZER["tok"] = byte_level_tokenizer(256)
    return _TOKENIZER["tok"]


def _calibrate(model_type, model, reference, inputs, work: Path, row: Row) -> str:
    import transformers

    from gmmquant.calibrate.families import CalibrationRefused
    from gmmquant.calibrate.pipeline import calibrate_model
    from gmmquant.recipes import parse_recipe
    from gmmquant.runtime.families import auto_model_class

    src = work / "float"
    model.save_pretrained(src)
    _tokenizer().save_pretrained(src)
    recipe = parse_recipe({"name": "census", "scheme": "w8a16",
                           "calibration": {"num_samples": 4, "seq_len": 32, "all_experts": True, "min_tokens": 1}})
    try:
        report = calibrate_model(src, work / "cal", recipe)
    except CalibrationRefused as exc:  # documented: seq2seq, two layer stacks
        return "refused: " + _short(exc).split(": ", 1)[1][:120]
    except Exception as exc:
        row.failures.append(f"calibrate: {_short(exc)}")
        return _short(exc)
    try:
        config = transformers.AutoConfig.from_pretrained(work / "cal")
        loaded = auto_model_class(config).from_pretrained(work / "cal").eval()
        err = _rel(_output(loaded, inputs), reference)
    except Exception as exc:
        row.failures.append(f"calibrate: {_short(exc)}")
        return _short(exc)
    # Some tiny random models move by several percent under any precision change (gpt_oss: bf16 alone gives
    # 8%): the calibrated checkpoint must be as close to the float model as round-to-nearest w8a16 is.
    bound = max(CALIBRATE_TOL, 1.5 * row.w8a16_logits_error)
    if err > bound:
        row.failures.append(f"calibrated output error {err:.2e} > {bound:.2e}")
    return f"ok, {len(report.layers)} layers, output err {err:.3f}"


def run(model_types: list[str], calibrate: "bool | set[str]" = True, log=None) -> list[Row]:
    rows = []
    for mt in model_types:
        with tempfile.TemporaryDirectory(prefix=f"census-{mt}-") as tmp:
            do_cal = calibrate if isinstance(calibrate, bool) else mt in calibrate
            row = check_family(mt, Path(tmp), do_cal)
        rows.append(row)
        if log:
            log(row)
    return rows


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.1e}"


def table(rows: list[Row]) -> str:
    lines = ["| model type | class | experts | float err | w8a16 err | save/load | calibrate | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r.status + (f": {r.note}" if r.note else "")
        lines.append(f"| {r.model_type} | {r.model_class} | {r.experts} | {_fmt(r.float_error)} | {_fmt(r.w8a16_error)} "
                     f"| {r.roundtrip} | {r.calibrate} | {status.replace('|', '/')} |")
    return "\n".join(lines)


BEGIN, END = "<!-- census:begin -->", "<!-- census:end -->"


def write_docs(rows: list[Row], path: Path, partial: bool = False) -> None:
    """Rewrite the census block of `path`; `partial`: replace only these rows of the existing table."""
    text = path.read_text()
    import transformers

    if partial and BEGIN in text:
        from discover import candidates

        old = {line.split("|")[1].strip(): line for line in text.split(BEGIN)[1].split(END)[0].splitlines()
               if line.startswith("| ") and not line.startswith("| model type")}
        new = {r.model_type: line for r, line in zip(rows, table(rows).splitlines()[2:])}
        lines = [new.get(c.model_type) or old.get(c.model_type) for c in candidates()]
        rows_text = "\n".join(table([]).splitlines() + [line for line in lines if line])
        count = len([line for line in lines if line])
    else:
        rows_text, count = table(rows), len(rows)

    block = (f"{BEGIN}\nGenerated by `python -m tests.families.census --write-docs` with transformers "
             f"{transformers.__version__} ({count} model types).\n\n{rows_text}\n{END}")
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Family census\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    from discover import candidates

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="only these (default: every discovered one)")
    parser.add_argument("--no-calibrate", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="regenerate the table in docs/RUNTIME.md")
    args = parser.parse_args(argv)
    types = args.model_types or [c.model_type for c in candidates()]
    rows = run(types, not args.no_calibrate,
               log=lambda r: print(f"{r.model_type:28s} {r.status:18s} {r.seconds:5.1f}s {r.note} {r.failures[:1]}", flush=True))
    print(table(rows))
    if args.write_docs:  # with model types named: only their rows are replaced
        write_docs(rows, Path(__file__).resolve().parents[2] / "docs" / "RUNTIME.md", partial=bool(args.model_types))
    return 0 if all(r.green for r in rows) else 1


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    sys.exit(main())
