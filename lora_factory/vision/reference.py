"""deepghs' imgutils as a reference: the same ONNX files run through the models' authors'
own inference code, to check the wrappers against it (parity tests) and to time it
beside them (cleaning benchmark).

imgutils pins numpy < 2 and the project needs numpy 2, so imgutils lives in its own
environment, `<project venv>/imgutils/` (the Makefile builds it; `LF_IMGUTILS_PYTHON`
points at another interpreter). `run_imgutils` writes the pictures as PNG files, runs
`imgutils_oracle.py` there on them and reads its answers back. The models are put into
a private Hugging Face cache at the repository ids and file names imgutils asks for,
and imgutils runs offline on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lora_factory.vision.registry import BUILTIN_SPECS, DEFAULT_MODELS

ORACLE_SCRIPT = Path(__file__).with_name("imgutils_oracle.py")
IMGUTILS_VERSION = "0.19.0"
SNAPSHOT = "0" * 40  # the commit the placed files pretend to come from

# What imgutils calls for each role, with its defaults (model names are checked against
# the project's defaults by the placement below: a different name is not found).
DETECT_FUNCTIONS = {"person": "detect_person", "halfbody": "detect_halfbody", "head": "detect_heads",
                    "face": "detect_faces"}  # fmt: skip
CLASSIFY_MODULES = {"monochrome": "imgutils.validate.monochrome", "classification": "imgutils.validate.classify",
                    "rating": "imgutils.validate.rating", "aesthetic": "imgutils.metrics.dbaesthetic"}  # fmt: skip
WD14_MODEL_NAME = "SwinV2_v3"  # imgutils' name for SmilingWolf/wd-swinv2-tagger-v3
WD14_EMBEDDINGS_REPO = "deepghs/wd14_tagger_with_embeddings"


def imgutils_python() -> Path:
    """The interpreter of the environment that holds imgutils."""
    configured = os.environ.get("LF_IMGUTILS_PYTHON")
    return Path(configured) if configured else Path(sys.prefix) / "imgutils" / "bin" / "python"


def imgutils_unavailable() -> str | None:
    """Why imgutils cannot run here, or None when it can."""
    python = imgutils_python()
    if not python.is_file():
        return f"no imgutils environment at {python} (`make install` builds it; or set LF_IMGUTILS_PYTHON)"
    done = subprocess.run([str(python), "-c", "import imgutils; print(imgutils.__version__ if "
                           "hasattr(imgutils, '__version__') else '')"],
                          capture_output=True, text=True, env=_environment(Path(tempfile.gettempdir())))  # fmt: skip
    if done.returncode != 0:
        return f"imgutils does not import in {python}: {done.stderr.strip().splitlines()[-1:]}"
    return None


def _environment(cache: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(cache), HF_HUB_CACHE=str(cache / "hub"), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", ONNX_MODE="cpu", TQDM_DISABLE="1")  # fmt: skip
    return env


class HubCache:
    """A private Hugging Face cache (the `HF_HOME` of the imgutils process)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def place(self, repo_id: str, path_in_repo: str, source: Path | bytes) -> Path:
        """Put a file at `repo_id`/`path_in_repo` as a download would have."""
        repo = self.root / "hub" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(SNAPSHOT)
        target = repo / "snapshots" / SNAPSHOT / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
        return target


def _spec(role: str):
    return next(spec for spec in BUILTIN_SPECS if spec.name == DEFAULT_MODELS[role])


def with_second_output(model_file: Path) -> bytes:
    """The WD14 model with an extra "embedding" output, as imgutils' copies of the
    taggers in deepghs/wd14_tagger_with_embeddings have (it reads exactly two outputs).
    The first output, the tag scores, is computed by the same graph."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(model_file)
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    name = graph.input[0].name
    if opset >= 18:
        graph.initializer.append(numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "embedding/axes"))
        node = helper.make_node("ReduceMean", [name, "embedding/axes"], ["embedding"], keepdims=0)
    else:
        node = helper.make_node("ReduceMean", [name], ["embedding"], axes=[1, 2], keepdims=0)
    graph.node.append(node)
    graph.output.append(helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", None]))
    return model.SerializeToString()


def place_models(cache: HubCache, folders: Mapping[str, Path]) -> None:
    """Put each role's model files (folders: role -> a folder as the wrappers load it)
    where imgutils looks for the project's default model of that role."""
    for role, folder in folders.items():
        folder = Path(folder)
        if role == "tagger":
            repo_id = _spec("tagger").repo_id
            cache.place(repo_id, "selected_tags.csv", folder / "selected_tags.csv")
            cache.place(WD14_EMBEDDINGS_REPO, f"{repo_id}/model.onnx", with_second_output(folder / "model.onnx"))
            continue
        spec = _spec(role)
        for file in folder.iterdir():
            if file.is_file() and not file.name.startswith("."):
                cache.place(spec.repo_id, f"{spec.folder}/{file.name}", file)


@dataclass(frozen=True)
class Job:
    """One imgutils call per picture for one role."""

    role: str
    images: Sequence[Image.Image]

    def describe(self, paths: list[str]) -> dict:
        if self.role in DETECT_FUNCTIONS:
            return {"kind": "detect", "function": DETECT_FUNCTIONS[self.role], "images": paths}
        if self.role in CLASSIFY_MODULES:
            return {"kind": "classify", "module": CLASSIFY_MODULES[self.role], "images": paths}
        if self.role == "identity":
            return {"kind": "ccip", "images": paths}
        if self.role == "tagger":
            return {"kind": "wd14", "model_name": WD14_MODEL_NAME, "images": paths}
        raise ValueError(f"no imgutils reference for role {self.role!r}")


def save_png(image: Image.Image, path: Path) -> Path:
    """Lossless, keeping the mode, alpha, palette and transparency of the picture."""
    image.save(path, "PNG")
    return path


def run_imgutils(cache: HubCache, jobs: Sequence[Job], work_dir: Path, timeout: float = 3600) -> list[dict]:
    """imgutils' answers for every job (see `imgutils_oracle.py` for their shape)."""
    reason = imgutils_unavailable()
    if reason:
        raise RuntimeError(reason)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    described = []
    for number, job in enumerate(jobs):
        paths = [str(save_png(image, work_dir / f"job{number}-{index}.png")) for index, image in enumerate(job.images)]
        described.append(job.describe(paths))
    jobs_path, results_path = work_dir / "jobs.json", work_dir / "results.json"
    jobs_path.write_text(json.dumps({"jobs": described}), encoding="utf-8")
    done = subprocess.run([str(imgutils_python()), str(ORACLE_SCRIPT), str(jobs_path), str(results_path)],
                          capture_output=True, text=True, env=_environment(cache.root), timeout=timeout)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"imgutils failed:\n{done.stderr[-4000:]}")
    return json.loads(results_path.read_text(encoding="utf-8"))["results"]
