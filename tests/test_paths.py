"""paths.py: the project root, where MLflow runs go from DVC's temporary copies, and the stage file layout."""

from __future__ import annotations

from pathlib import Path

from transferlab.paths import SPLITS, StagePaths, project_root, tracking_root


def test_project_root_is_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path.resolve()


def test_tracking_root_leaves_dvc_experiment_copies(tmp_path: Path) -> None:
    assert tracking_root(tmp_path) == tmp_path.resolve()
    assert tracking_root(tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12") == tmp_path.resolve()


def test_data_lives_in_the_project_and_run_outputs_in_the_job_folder(tmp_path: Path) -> None:
    job = StagePaths(tmp_path, output_root=tmp_path / "outputs" / "runs" / "x")
    assert job.splits == tmp_path / "data" / "splits" and job.raw_dataset("a") == tmp_path / "data" / "raw" / "a"
    assert job.feature_cache.is_relative_to(tmp_path / "data" / "cache")
    assert job.model_file == tmp_path / "outputs" / "runs" / "x" / "models" / "model.keras"
    assert job.metrics.is_relative_to(job.out / "reports") and job.checkpoints.is_relative_to(job.out)
    assert StagePaths(tmp_path).out == tmp_path
    assert [job.manifest(name).name for name in SPLITS] == ["train.csv", "val.csv", "test.csv"]


def test_stage_outputs_do_not_overlap_and_caches_are_not_outputs(tmp_path: Path) -> None:
    paths = StagePaths(tmp_path)
    outputs = [path for stage in paths.stage_outputs().values() for path in stage]
    assert len(set(outputs)) == len(outputs)
    for output in outputs:
        others = [o for o in outputs if o != output]
        assert not any(output in o.parents or o in output.parents for o in others), output
        assert not any(cache in output.parents or output in cache.parents for cache in paths.caches)
