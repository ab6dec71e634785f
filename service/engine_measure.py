"""Which engine, precision and file to serve: measured once per model and machine, or forced.

The candidates are every way this server can run the model whose accuracy is known to hold:
onnxruntime fp32, OpenVINO fp32 (and bf16 where the CPU has it) on the fp32 file, and each
manifest variant (int8 files) whose accuracy gate, measured at export, passes
(``artifact.gates``). A variant whose gate failed is never a candidate and cannot be forced.

With ``DINO_ENGINE``, ``DINO_PRECISION`` and ``DINO_MODEL_VARIANT`` all ``auto``, each candidate
runs a few batches of ``DINO_MAX_BATCH`` images, interleaved so that a noisy neighbour slows them
alike, and the fastest is served. Why measure rather than go by CPU name: the best choice differs
between CPUs with the same flags (bf16 is 4x fp32 with AMX, int8 twice bf16 with VNNI only), and
a few seconds of timing settle it. The result is cached in ``DINO_DATA_DIR/engine_choice.json``,
keyed on the model's files, the CPU flags, the engine versions and the thread settings, so a
restart on the same machine opens the chosen engine directly. Any setting other than ``auto``
forces the choice and skips the measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from artifact.cpu import cpu_flags
from artifact.files import write_text_atomic
from artifact.gates import gate_failure
from artifact.manifest import ArtifactError, Manifest
from service.engine_choice import OPENVINO_CACHE, Engine, model_file, open_engine, resolve
from service.settings import Settings, SettingsError

log = logging.getLogger(__name__)

CACHE_NAME = "engine_choice.json"
CACHE_FORMAT = 1
ROUNDS = 3  # timed rounds per candidate (after one warm-up call), interleaved


@dataclass(frozen=True)
class Candidate:
    engine: str  # onnxruntime | openvino
    precision: str  # fp32 | bf16 | int8
    variant: str  # "fp32" (model.onnx) or a manifest variant key

    @property
    def label(self) -> str:
        tail = "" if self.variant in ("fp32", self.precision) else f" ({self.variant})"
        return f"{self.engine} {self.precision}{tail}"

    @property
    def engine_precision(self) -> str:
        """The precision hint the engine gets: int8 files run their other ops in fp32, as
        their gate was measured."""
        return "fp32" if self.precision == "int8" else self.precision


@dataclass
class Choice:
    """What is served and why: ``how`` is measured, cached or forced; ``timings`` img/s."""

    candidate: Candidate
    how: str
    timings: dict[str, float] = field(default_factory=dict)
    measured_s: float | None = None
    refused: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "engine": self.candidate.engine,
            "precision": self.candidate.precision,
            "variant": self.candidate.variant,
            "how": self.how,
            "images_per_s": self.timings,
            "measured_s": self.measured_s,
            "refused_variants": self.refused,
        }


def _openvino_bf16() -> tuple[bool, bool]:
    from service.engine_openvino import cpu_supports_bf16, openvino_available

    available = openvino_available()
    return available, available and cpu_supports_bf16()


def candidates(
    manifest: Manifest, probe_openvino: bool = True
) -> tuple[list[Candidate], dict[str, str]]:
    """The runnable candidates, and the variants refused with why (gate failed or missing).
    ``probe_openvino=False`` leaves OpenVINO out without importing it (a second or more of
    start-up when onnxruntime is forced)."""
    has_ov, has_bf16 = _openvino_bf16() if probe_openvino else (False, False)
    found = [Candidate("onnxruntime", "fp32", "fp32")]
    if has_ov:
        found.append(Candidate("openvino", "fp32", "fp32"))
    if has_bf16:
        found.append(Candidate("openvino", "bf16", "fp32"))
    refused: dict[str, str] = {}
    for key, variant in manifest.variants.items():
        why = gate_failure(variant)
        if why is not None:
            refused[key] = f"failed its accuracy gate: {why}"
        elif variant.engine == "openvino" and not has_ov:
            refused[key] = "needs OpenVINO, which is not installed (extra fast)"
        else:
            precision = "int8" if variant.precision.startswith("int8") else variant.precision
            found.append(Candidate(variant.engine, precision, key))
    return found, refused


def is_forced(settings: Settings) -> bool:
    return any(v != "auto" for v in (settings.engine, settings.precision, settings.model_variant))


def _needs_openvino(s: Settings) -> bool:
    """Whether forcing these settings can involve OpenVINO (else it is not even imported)."""
    plain = s.engine == "onnxruntime" and s.model_variant in ("auto", "fp32")
    return not (plain and s.precision != "int8")


def forced(manifest: Manifest, settings: Settings) -> Candidate:
    """The candidate the settings name; ``SettingsError`` / ``ArtifactError`` saying why when it
    cannot be served (no such variant, failed gate, wrong engine for the file)."""
    engine, precision, variant = settings.engine, settings.precision, settings.model_variant
    found, refused = candidates(manifest, _needs_openvino(settings))
    if variant == "auto":
        variant = "fp32"
        if precision == "int8":
            int8 = [c for c in found if c.precision == "int8" and engine in ("auto", c.engine)]
            if not int8:
                why = "; ".join(f"{k} {r}" for k, r in refused.items()) or "it has none"
                raise ArtifactError(
                    f"DINO_PRECISION=int8: model {manifest.name!r} has no int8 variant that "
                    f"{engine if engine != 'auto' else 'any engine'} can serve ({why})"
                )
            return int8[-1]  # the OpenVINO one when there are both (listed last)
    if variant in refused:
        raise ArtifactError(
            f"DINO_MODEL_VARIANT={variant}: model {manifest.name!r}'s {variant} variant "
            f"{refused[variant]}; it is never served. Serve fp32 (DINO_MODEL_VARIANT=auto) or "
            "re-export the model"
        )
    if variant == "fp32":
        if precision == "int8":
            raise SettingsError("DINO_PRECISION=int8 needs DINO_MODEL_VARIANT=auto or an int8 one")
        return Candidate(*resolve(engine, precision, "fp32"), "fp32")
    model_file(manifest, variant)  # raises, naming the variants there are
    match = [c for c in found if c.variant == variant]
    if not match:  # listed as a file but without a gate record (an older export)
        raise ArtifactError(
            f"DINO_MODEL_VARIANT={variant}: model {manifest.name!r} has no accuracy gate record "
            f"for its {variant} file, so it is never served; re-export the model"
        )
    chosen = match[0]
    if engine not in ("auto", chosen.engine) or precision not in ("auto", chosen.precision):
        raise SettingsError(
            f"the {variant} variant runs on {chosen.engine} in {chosen.precision}; unset "
            "DINO_ENGINE / DINO_PRECISION or set them to that"
        )
    return chosen


def cache_key(manifest: Manifest, settings: Settings) -> dict:
    """What the measurement depends on: any change re-measures."""
    import onnxruntime

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    flags = hashlib.sha256(" ".join(cpu_flags()).encode()).hexdigest()[:16]
    return {
        "model_sha256": manifest.model_sha256,
        "files": {name: entry.sha256 for name, entry in sorted(manifest.files.items())},
        "variants": {k: v.model_dump(mode="json") for k, v in sorted(manifest.variants.items())},
        "cpu_flags_sha256": flags,
        "onnxruntime": onnxruntime.__version__,
        "openvino": ov_version,
        "threads": settings.threads,
        "engine_streams": settings.engine_streams,
        "max_batch": settings.max_batch,
    }


def read_cache(path: Path, key: dict) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != key:
        return None
    return data


def write_cache(path: Path, key: dict, choice: Choice) -> None:
    record = {"format": CACHE_FORMAT, "key": key, "choice": asdict(choice.candidate)}
    record.update(timings=choice.timings, measured_s=choice.measured_s, measured_at=time.time())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    except OSError as exc:  # a read-only data dir costs a measurement per start, nothing more
        log.warning("cannot cache the engine choice in %s: %s", path, exc)


def open_candidate(model_dir: Path, manifest: Manifest, c: Candidate, s: Settings) -> Engine:
    """``c`` opened with the server's settings; OpenVINO's compiled models cached in the data
    folder (``openvino_cache``)."""
    return open_engine(
        model_dir, manifest, c.variant, s.threads, c.engine, c.engine_precision, s.engine_streams,
        Path(s.data_dir) / OPENVINO_CACHE,
    )  # fmt: skip


def throughput(engine: Engine, batch: np.ndarray, pool: ThreadPoolExecutor) -> float:
    """Images/s with as many batches in flight as the engine runs at once (its streams)."""
    calls = int(getattr(engine, "parallel_calls", 1))
    t0 = time.perf_counter()
    done = list(pool.map(lambda _: engine.run(batch, ("embedding",)), range(calls)))
    took = time.perf_counter() - t0
    if not all(np.isfinite(d["embedding"]).all() for d in done):
        return 0.0  # an engine that computes NaNs is never the fastest
    return calls * len(batch) / took


def measure(
    model_dir: Path, manifest: Manifest, found: list[Candidate], s: Settings
) -> tuple[dict[str, float], dict[str, Engine]]:
    """Median images/s of each candidate over ``ROUNDS`` interleaved rounds, and the engines."""
    crop = manifest.eval_transform.crop
    batch = np.random.default_rng(0).standard_normal((s.max_batch, 3, crop, crop), np.float32)
    engines: dict[str, Engine] = {}
    rates: dict[str, list[float]] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for c in found:
            try:
                engines[c.label] = open_candidate(model_dir, manifest, c, s)
                throughput(engines[c.label], batch, pool)  # warm-up: first-call allocations
                rates[c.label] = []
            except ArtifactError as exc:
                log.warning("engine choice: %s cannot run here: %s", c.label, exc)
        for r in range(ROUNDS):
            order = list(rates)
            shift = r % len(order)
            for label in order[shift:] + order[:shift]:
                rates[label].append(throughput(engines[label], batch, pool))
    timings = {label: round(float(np.median(v)), 2) for label, v in rates.items()}
    return timings, engines


def choose_engine(model_dir: Path, manifest: Manifest, s: Settings) -> tuple[Choice, Engine]:
    """The engine to serve, opened, and the record of why (see the module docstring)."""
    if is_forced(s):
        c = forced(manifest, s)
        choice = Choice(c, "forced", refused=candidates(manifest, _needs_openvino(s))[1])
        log.info("engine: %s, forced by the settings (no measurement)", c.label)
        return choice, open_candidate(model_dir, manifest, c, s)
    found, refused = candidates(manifest)
    for key, why in refused.items():
        log.warning("engine choice: the %s variant is never served: it %s", key, why)
    path = Path(s.data_dir) / CACHE_NAME
    key = cache_key(manifest, s)
    cached = read_cache(path, key)
    if cached is not None:
        c = Candidate(**cached["choice"])
        if c in found:
            choice = Choice(c, "cached", cached["timings"], cached["measured_s"], refused)
            log.info("engine: %s, the fastest when measured (%s img/s); cached in %s",
                     c.label, cached["timings"], path)  # fmt: skip
            return choice, open_candidate(model_dir, manifest, c, s)
    t0 = time.perf_counter()
    timings, engines = measure(model_dir, manifest, found, s)
    if not timings:
        raise ArtifactError(f"no engine can run model {manifest.name!r} here")
    best = max(timings, key=timings.__getitem__)
    c = next(c for c in found if c.label == best)
    choice = Choice(c, "measured", timings, round(time.perf_counter() - t0, 2), refused)
    log.info("engine: %s, the fastest of %s img/s at batch %d (measured in %.1f s)",
             c.label, timings, s.max_batch, choice.measured_s)  # fmt: skip
    write_cache(path, key, choice)
    return choice, engines[best]
