"""Where vision models come from: a local path, a model the project builds itself, or a
Hugging Face repository file found locally.

Nothing here downloads unless `offline=False`; a model that cannot be found raises
`ModelNotFoundError` naming every place looked and the one command that fetches it.
Specs are plain data: when a repository moves or renames a file, fix the spec here.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lora_factory.storage import sha256_file

KINDS = ("tagger", "identity", "detector", "classifier")


class ModelNotFoundError(FileNotFoundError):
    """A model's files are not on this machine."""


class ModelIntegrityError(ValueError):
    """A model file's sha256 is not the pinned one."""


@dataclass(frozen=True)
class ModelSpec:
    """One model: which files (relative to the repository root) make it up.

    All files of a spec live in one folder of the repository; `resolve` returns that
    folder. `defaults` holds the model's recommended settings (e.g. conf_threshold,
    iou_threshold, and for a detector resize: "stretch" or "letterbox").
    A model the project builds itself has no repository but a `build(folder)` that
    writes its files into `folder` (deterministically: it runs on every resolve).
    """

    name: str
    repo_id: str | None
    files: tuple[str, ...]
    revision: str = "main"
    sha256: Mapping[str, str] = field(default_factory=dict)
    kind: str = field(kw_only=True)  # one of KINDS
    defaults: Mapping[str, float | str] = field(default_factory=dict)
    build: Callable[[Path], object] | None = field(default=None, kw_only=True)
    # Files some versions of the model ship and the wrapper then follows (a classifier's
    # preprocess.json): taken from the Hugging Face cache (or downloaded) when the
    # repository has them, never required.
    optional_files: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        if (self.repo_id is None) == (self.build is None):
            raise ValueError(f"model {self.name!r}: give either a repository or a build function")
        if self.kind not in KINDS:
            raise ValueError(f"model {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.files:
            raise ValueError(f"model {self.name!r} lists no files")
        folders = {PurePosixPath(f).parent for f in self.files}
        if len(folders) != 1:
            raise ValueError(f"model {self.name!r}: all files must share one folder, got {sorted(map(str, folders))}")
        unknown = set(self.sha256) - set(self.files)
        if unknown:
            raise ValueError(f"model {self.name!r}: sha256 given for files it does not list: {sorted(unknown)}")

    @property
    def folder(self) -> str:
        """The files' folder inside the repository ("" for the root)."""
        parent = str(PurePosixPath(self.files[0]).parent)
        return "" if parent == "." else parent

    def fetch_command(self, cache_dir: Path | None = None) -> str:
        """The command that downloads this model into the Hugging Face cache."""
        if self.repo_id is None:
            raise ValueError(f"model {self.name!r} is built by the project and has nothing to fetch")
        parts = ["hf", "download", self.repo_id, *self.files, "--revision", self.revision]
        if cache_dir is not None:
            parts += ["--cache-dir", str(cache_dir)]
        return shlex.join(parts)


def _hub(name: str, repo_id: str, folder: str, files: Iterable[str], kind: str, **defaults: float | str) -> ModelSpec:
    optional = tuple(f"{folder}/{f}" for f in CLASSIFIER_OPTIONAL_FILES) if kind == "classifier" else ()
    return ModelSpec(name, repo_id, tuple(f"{folder}/{f}" for f in files), kind=kind, defaults=defaults,
                     optional_files=optional)


WD14_FILES = ("model.onnx", "selected_tags.csv")
CCIP_FILES = ("model_feat.onnx", "model_metrics.onnx", "metrics.json")
DETECTOR_FILES = ("model.onnx",)
CLASSIFIER_FILES = ("model.onnx", "meta.json")
CLASSIFIER_OPTIONAL_FILES = ("preprocess.json",)

# Real models (the deepghs/imgutils repository layouts). Detector
# folders are named after the model; classifier folders are the chosen variant.
BUILTIN_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("wd-swinv2-tagger-v3", "SmilingWolf/wd-swinv2-tagger-v3", WD14_FILES, kind="tagger"),
    ModelSpec("wd-convnext-tagger-v3", "SmilingWolf/wd-convnext-tagger-v3", WD14_FILES, kind="tagger"),
    ModelSpec("wd-vit-tagger-v3", "SmilingWolf/wd-vit-tagger-v3", WD14_FILES, kind="tagger"),
    _hub("ccip-caformer-24-randaug-pruned", "deepghs/ccip_onnx",
         "ccip-caformer-24-randaug-pruned", CCIP_FILES, "identity"),
    _hub("person_detect_v1.1_m", "deepghs/anime_person_detection",
         "person_detect_v1.1_m", DETECTOR_FILES, "detector", conf_threshold=0.3, iou_threshold=0.5),
    _hub("head_detect_v2.0_s", "deepghs/anime_head_detection",
         "head_detect_v2.0_s", DETECTOR_FILES, "detector", conf_threshold=0.4),
    _hub("face_detect_v1.4_s", "deepghs/anime_face_detection",
         "face_detect_v1.4_s", DETECTOR_FILES, "detector", conf_threshold=0.25),
    _hub("halfbody_detect_v1.0_s", "deepghs/anime_halfbody_detection",
         "halfbody_detect_v1.0_s", DETECTOR_FILES, "detector", conf_threshold=0.5),
    _hub("monochrome_detect", "deepghs/monochrome_detect",
         "mobilenetv3_large_100_dist_safe2", CLASSIFIER_FILES, "classifier"),
    _hub("anime_classification", "deepghs/anime_classification",
         "mobilenetv3_v1.5_dist", CLASSIFIER_FILES, "classifier"),
    # imgutils' default. The repository's model card (last edited June 2023) only lists
    # the 2023 models and recommends none; this one is from January 2024.
    _hub("anime_rating", "deepghs/anime_rating",
         "mobilenetv3_v1_pruned_ls0.1", CLASSIFIER_FILES, "classifier"),
    _hub("anime_aesthetic", "deepghs/anime_aesthetic",
         "swinv2pv3_v0_448_ls0.2_x", CLASSIFIER_FILES, "classifier", input_size=448),
    _hub("ai_image_corrupted", "deepghs/ai_image_corrupted",
         "caformer_s36_v0_focal", CLASSIFIER_FILES, "classifier"),
)  # fmt: skip

# The model each role of `VisionModels` uses unless told otherwise.
DEFAULT_MODELS: dict[str, str] = {
    "tagger": "wd-swinv2-tagger-v3",
    "identity": "ccip-caformer-24-randaug-pruned",
    "person": "person_detect_v1.1_m",
    "halfbody": "halfbody_detect_v1.0_s",
    "head": "head_detect_v2.0_s",
    "face": "face_detect_v1.4_s",
    "monochrome": "monochrome_detect",
    "classification": "anime_classification",
    "rating": "anime_rating",
    "aesthetic": "anime_aesthetic",
}


class ModelRegistry:
    """Resolves model names (or local paths) to local folders/files.

    - an existing local file or folder is used as it is;
    - a spec with a build function is (re)built into `models_dir/built/<name>/`;
    - a hub spec is looked for in `models_dir/hub/<repo_id>/<files>` and then in the
      local Hugging Face cache (`hf_cache_dir`, default: the standard cache); with
      `offline=False` a missing hub file is downloaded into that cache.
    """

    def __init__(
        self,
        models_dir: Path,
        offline: bool = True,
        specs: Iterable[ModelSpec] = BUILTIN_SPECS,
        hf_cache_dir: Path | None = None,
    ):
        self.models_dir = Path(models_dir)
        self.offline = offline
        self.hf_cache_dir = Path(hf_cache_dir) if hf_cache_dir is not None else None
        self._specs: dict[str, ModelSpec] = {}
        self._lock = threading.Lock()
        for spec in specs:
            self.register(spec)

    def register(self, spec: ModelSpec) -> None:
        self._specs[spec.name] = spec

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise ModelNotFoundError(
                f"unknown model {name!r}: not an existing path and not a registered model; "
                f"registered models: {sorted(self._specs)}"
            ) from None

    @property
    def names(self) -> list[str]:
        return sorted(self._specs)

    def resolve(self, name_or_path: str | Path) -> Path:
        """The local folder holding the model's files (or the given existing path)."""
        path = Path(name_or_path).expanduser()
        if path.exists():
            return path
        spec = self.spec(str(name_or_path))
        with self._lock:
            if spec.build is None:
                return self._find_hub(spec)
            folder = self.models_dir / "built" / spec.name
            spec.build(folder)
            self._check_sha256(spec, {f: folder / f for f in spec.files})
            return folder

    def files(self, name_or_path: str | Path) -> dict[str, Path]:
        """The model's files by name: a registry model's own files, every file of a path."""
        folder = self.resolve(name_or_path)
        if Path(name_or_path).expanduser().exists():
            if folder.is_file():
                return {folder.name: folder}
            return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return {PurePosixPath(f).name: folder / PurePosixPath(f).name for f in self.spec(str(name_or_path)).files}

    def _find_hub(self, spec: ModelSpec) -> Path:
        assert spec.repo_id is not None
        manual = self.models_dir / "hub" / spec.repo_id
        looked = [str(manual / spec.folder)]
        found = {f: manual / f for f in spec.files}
        if not all(p.is_file() for p in found.values()):
            found, where = self._from_hf_cache(spec)
            looked.append(where)
        if found is None:
            missing_note = "" if self.offline else " (download failed)"
            raise ModelNotFoundError(
                f"model {spec.name!r} ({spec.repo_id}@{spec.revision}: {', '.join(spec.files)}) is not on "
                f"this machine{missing_note}. Looked in: {'; '.join(looked)}. Fetch it with:\n"
                f"  {spec.fetch_command(self.hf_cache_dir)}\n"
                f"or copy the files into {manual}/ keeping their paths."
            )
        self._check_sha256(spec, found)
        return next(iter(found.values())).parent

    def _from_hf_cache(self, spec: ModelSpec) -> tuple[dict[str, Path] | None, str]:
        try:
            from huggingface_hub import constants, errors, hf_hub_download
        except ImportError:
            return None, "the Hugging Face cache (huggingface_hub is not installed)"
        cache = self.hf_cache_dir or Path(constants.HF_HUB_CACHE)
        where = f"the Hugging Face cache {cache}"
        found = {}
        for file_name in spec.files:
            try:
                found[file_name] = Path(
                    hf_hub_download(
                        spec.repo_id,
                        file_name,
                        revision=spec.revision,
                        cache_dir=self.hf_cache_dir,
                        local_files_only=self.offline,
                    )
                )
            except (errors.LocalEntryNotFoundError, errors.EntryNotFoundError, errors.RepositoryNotFoundError,
                    errors.RevisionNotFoundError, errors.HfHubHTTPError, OSError):  # fmt: skip
                return None, where
        for file_name in spec.optional_files:
            try:
                hf_hub_download(spec.repo_id, file_name, revision=spec.revision, cache_dir=self.hf_cache_dir,
                                local_files_only=self.offline)
            except (errors.LocalEntryNotFoundError, errors.EntryNotFoundError, errors.RepositoryNotFoundError,
                    errors.RevisionNotFoundError, errors.HfHubHTTPError, OSError):  # fmt: skip
                pass  # the model has none: the wrapper's default preprocessing applies
        return found, where

    @staticmethod
    def _check_sha256(spec: ModelSpec, files: Mapping[str, Path]) -> None:
        for file_name, expected in spec.sha256.items():
            actual = sha256_file(files[file_name])
            if actual != expected.lower():
                raise ModelIntegrityError(
                    f"model {spec.name!r}: {files[file_name]} has sha256 {actual}, expected {expected}. "
                    "The file is corrupt or another version: delete it and fetch it again"
                    + (f" ({spec.fetch_command()} --force-download)." if spec.repo_id else ".")
                )
