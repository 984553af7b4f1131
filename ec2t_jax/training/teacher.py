"""The teacher of a distilled run (`config.distill`): where it comes from, and its checks.

`config.distill.teacher` names it:

* `'fp'`: the run's own full-precision network, as its first full-precision
  stage ends (saved as `WORKDIR/teacher_variables`, which later full-precision
  stages do not overwrite as they do `fp_variables`); without a full-precision
  stage, the network the run starts from (`config.init_from`, or a grown
  base);
* a path: a workdir of a finished run (its own model and variables), an
  orbax directory of variables (`checkpoint.save_variables`) or a PyTorch
  `.pt`/`.pth` state_dict of `config.model`.

A teacher must map the run's inputs to the run's classes: a workdir teacher
is checked against the image shape and classes its checkpoint records (and,
once the data is open, its input normalization), a variables file by loading
it into `config.model`. The teacher's `sha256` is kept in the run's
checkpoints, and a resume with another teacher is refused.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np

from ec2t_jax.training import checkpoint as checkpoint_lib
from ec2t_jax.training import setup as setup_lib
from ec2t_jax.training import spec as spec_lib
from ec2t_jax.training import variables as variables_lib

__all__ = [
  'FP_TEACHER',
  'TEACHER_DIR',
  'Distillation',
  'Teacher',
  'check_source',
  'load_path_teacher',
  'teacher_of_variables',
]

FP_TEACHER = 'fp'
"""`config.distill.teacher` for the run's own full-precision network."""


class Teacher(NamedTuple):
  """A teacher network in eval mode.

  Attributes:
    model: its linen module (the run's own for `'fp'` and variables files).
    variables: `{'params', 'batch_stats'}`.
    sha256: `setup.params_sha256` of its variables (its provenance in checkpoints).
  """

  model: Any
  variables: dict[str, Any]
  sha256: str


def teacher_of_variables(model: Any, variables: dict[str, Any]) -> Teacher:
  """The `Teacher` of `variables` for `model` (e.g. the run's network when fp training ends)."""
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats') or {}}
  return Teacher(model, variables, setup_lib.params_sha256(variables))


def _is_workdir(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, 'config.json'))


def check_source(run: spec_lib.RunSpec) -> None:
  """Refuses a path teacher that does not exist or does not fit the run's data (one line).

  A workdir teacher must record the run's number of classes and image shape;
  a variables file must load into `config.model` with the
  run's classes (its shapes are checked, nothing is computed).

  Raises:
    ValueError: naming `config.distill.teacher`, what differs, and what would fit.
    FileNotFoundError: for a path that does not exist.
  """
  source = run.distill.teacher
  if not source or source == FP_TEACHER:
    return
  if not os.path.exists(source):
    raise FileNotFoundError(
      f"config.distill.teacher={source!r} does not exist; give 'fp' (the run's own "
      'full-precision network), a workdir of a finished run, an orbax variables directory or '
      'a .pt/.pth file'
    )
  data = run.data
  if _is_workdir(source):
    from ec2t_jax.training import workdir as workdir_lib  # Local: workdir imports parse.

    _, num_classes, image_shape, _ = workdir_lib.recorded_data_facts(source)
    theirs = {'num_classes': num_classes, 'image_shape': tuple(image_shape)}
    mine = {'num_classes': data.num_classes, 'image_shape': tuple(data.image_shape)}
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
      shown = ', '.join(f'{k} {theirs[k]!r} (this run: {mine[k]!r})' for k in diff)
      raise ValueError(
        f'config.distill.teacher={source!r} was trained for other inputs or classes: {shown}; '
        'a teacher must map the same inputs to the same classes'
      )
    return
  _load_file(run)  # Loads and checks the shapes; the variables are loaded again for training.


def load_path_teacher(run: spec_lib.RunSpec) -> Teacher:
  """The teacher at `config.distill.teacher` (a path), loaded.

  Raises:
    ValueError: naming the path when it cannot be read or does not fit the run.
  """
  source = run.distill.teacher
  if _is_workdir(source):
    from ec2t_jax.training import workdir as workdir_lib  # Local, as in check_source.

    loaded = workdir_lib.load_workdir(source)
    return teacher_of_variables(loaded.model, loaded.variables)
  return teacher_of_variables(*_load_file(run))


def _load_file(run: spec_lib.RunSpec) -> tuple[Any, dict[str, Any]]:
  """`(model, variables)` of a teacher file of `config.model` (orbax directory or .pt/.pth)."""
  source = run.distill.teacher
  data = run.data
  model = variables_lib.create_model(run.model, data.num_classes)
  expected = variables_lib.initial_shapes(model, data.image_shape)
  try:
    variables = variables_lib.load_variables(
      source, run.model, expected, num_classes=data.num_classes, what='config.distill.teacher'
    )
  except ValueError as e:
    raise ValueError(
      f'{e} (a teacher file must hold {run.model.name} variables for {data.num_classes} classes '
      f'and {tuple(data.image_shape)} images)'
    ) from e
  return model, variables


TEACHER_DIR = 'teacher_variables'
"""The workdir's copy of an `'fp'` teacher, written when its stage ends (read on resume)."""


class Distillation:
  """The teacher of a run as it trains: when it exists, what each step gets, its provenance.

  A path teacher is loaded at the start. The `'fp'` teacher exists from the
  step its full-precision stage ends (`reached` saves it to
  `WORKDIR/teacher_variables`; a resume after that step reads it back), or
  from step 0 as the network the run starts from when it has no such stage.
  Each checkpoint's metadata records the teacher's `sha256`; a resume whose
  teacher differs is refused.
  """

  def __init__(self, run: spec_lib.RunSpec, setup: Any, workdir: str, sharding: Any):
    self.teacher: Teacher | None = None
    self._run, self._setup, self._workdir, self._sharding = run, setup, workdir, sharding
    self._device_variables = None
    self._ready_at = None  # The step at which an 'fp' teacher appears.
    if run.distills and run.distill.teacher == FP_TEACHER:
      fp = [s for s in setup.schedule.stages if s.num_steps and not s.kind_info.compresses]
      self._ready_at = fp[0].end if fp else 0

  def start(self, step: int, meta: dict[str, Any], normalization: Any) -> None:
    """Loads the teacher that exists at `step` (start or resume) and checks its provenance.

    Raises:
      ValueError: for a resume whose teacher is not the one its checkpoints
        were trained with, or a workdir teacher whose input normalization differs.
    """
    run = self._run
    if not run.distills:
      return
    if self._ready_at is None:
      self._set(load_path_teacher(run), meta)
      theirs = _recorded_normalization(run.distill.teacher)
      if (
        theirs is not None
        and normalization is not None
        and not np.allclose(
          np.asarray(theirs, np.float64), np.asarray(normalization, np.float64), rtol=1e-5
        )
      ):
        raise ValueError(
          f'config.distill.teacher={run.distill.teacher!r} normalizes its inputs with '
          f'{theirs}, this run with {normalization}: a teacher must see the inputs it was '
          'trained on; train it on the same data, or set config.normalization alike'
        )
    elif self._ready_at == 0:
      self._set(teacher_of_variables(self._setup.model, self._setup.variables), meta)
    elif step >= self._ready_at:
      path = os.path.join(self._workdir, TEACHER_DIR)
      if not os.path.isdir(path):
        raise ValueError(
          f"{path!r} is missing: the run distills from its full-precision network ('fp'), "
          'saved there when its stage ended; restore it, or start over with '
          '--config.overwrite=True'
        )
      self._set(teacher_of_variables(self._setup.model, checkpoint_lib.load_variables(path)), meta)

  def reached(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """After the step that ended at `step`: an `'fp'` teacher is saved where its stage ends."""
    if self._ready_at is None or step != self._ready_at or self.teacher is not None:
      return
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    # Every process takes part in an orbax save (it synchronizes them).
    checkpoint_lib.save_variables(os.path.join(self._workdir, TEACHER_DIR), variables)
    self._set(teacher_of_variables(self._setup.model, jax.device_get(variables)), meta)

  def _set(self, teacher: Teacher, meta: dict[str, Any]) -> None:
    recorded = meta.get('teacher_sha256')
    if recorded is not None and recorded != teacher.sha256:
      raise ValueError(
        f'the checkpoints of {self._workdir!r} were trained with another teacher (sha256 '
        f'{recorded[:12]}..., now {teacher.sha256[:12]}... from '
        f'config.distill.teacher={self._run.distill.teacher!r}); restore that teacher, or '
        'start over with --config.overwrite=True'
      )
    meta['teacher_sha256'] = teacher.sha256
    self.teacher = teacher
    self._device_variables = jax.device_put(teacher.variables, self._sharding)

  def step_args(self, stage: Any) -> tuple[Any, Any, Any] | None:
    """`(variables, temperature, weight)` for a step of `stage`; None where it does not distill.

    Args:
      stage: a `schedule.Stage` of the run (its name finds its `StageSpec`).
    """
    spec = next(s for s in self._run.stages if s.name == stage.name)
    weight, temperature = spec.distillation
    if self.teacher is None or weight <= 0:
      return None
    return (self._device_variables, np.float32(temperature), np.float32(weight))


def _recorded_normalization(source: str):
  """The normalization a workdir teacher's checkpoint records, else None."""
  if not _is_workdir(source):
    return None
  from ec2t_jax.training import workdir as workdir_lib  # Local: workdir imports parse.

  return workdir_lib.recorded_data_facts(source)[3]
