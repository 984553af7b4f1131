"""Base configuration: every field the training program reads, with the original recipe.

Recipes in this package import this file and override what differs. Fields
follow the Flax examples where they exist (`model`, `dataset`, `batch_size`,
`half_precision`, `log_every_steps`, `seed`); EC2T settings live in `config.ec2t`.
"""

import ml_collections


def get_config():
  """The base config (LeNet-5 on the embedded MNIST)."""
  config = ml_collections.ConfigDict()

  # --- model and data ---------------------------------------------------------------
  config.model = 'lenet5'
  config.model_kwargs = ml_collections.ConfigDict()
  config.dataset = 'mnist'
  config.data_dir = ''  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.num_classes = 0  # 0 = the dataset's.
  config.image_size = 224  # Used when the dataset has no fixed image shape (ImageNet).
  # Per-channel (mean, std) of pixels scaled to [0, 1], e.g. '((0.5,), (0.25,))';
  # '' = the dataset's (your own data: computed from its training records).
  config.normalization = ''
  # Evaluation transform of ImageNet-style data: the fraction of the resized image the
  # centre crop keeps (0 = the default 0.875, i.e. 256 -> 224; 1.0 = resize straight to
  # the evaluation size, as the original's EfficientNet evaluation) and the resize filter
  # ('' = bilinear, or 'bicubic').
  config.eval_crop_fraction = 0.0
  config.eval_resize_method = ''
  config.eval_image_size = 0  # Evaluation side of such data; 0 = config.image_size.
  config.validation_size = -1  # Held out from the END of 'train'; -1 = the dataset's default.
  config.num_train_examples = 0  # 0 = the source's size (tfds mock data needs a number).
  config.num_eval_examples = 0  # 0 = all; a limit for smoke runs.
  config.steps_per_epoch = 0  # 0 = len(train) // batch_size; a cap for smoke runs.
  config.in_memory = True  # Small datasets are read into RAM once (much faster).
  config.worker_count = 0  # grain worker processes (0 = in-process).

  # --- training ----------------------------------------------------------------------
  config.batch_size = 256  # Global, over all devices and processes.
  config.eval_batch_size = 1000
  config.half_precision = False  # bfloat16 compute; params and EC2T state stay float32.
  config.seed = 0
  config.init_from = ''  # Pretrained variables: orbax dir (save_variables) or .pt/.pth.
  # True for recipes that compress a pretrained network (no full-precision stage): the run
  # refuses to start without init_from unless this is set False explicitly.
  config.needs_init_from = False
  # Grow a pretrained base network (init_from holds its variables) into config.model, a
  # compound-scaled super-network, before the first stage (docs/recipes.md):
  # base_model '' = no growth.
  config.grow = ml_collections.ConfigDict()
  config.grow.base_model = ''
  config.grow.base_model_kwargs = ml_collections.ConfigDict()
  config.grow.split = 'equal'  # 'equal' (Net2Net) or 'random' shares of replicated channels.
  config.grow.seed = 0
  config.skip_nonfinite = False  # True: skip (and count) steps with NaN/inf instead of stopping.
  config.num_devices = 0  # 0 = every device; n = the first n (one host only).
  config.distributed = False  # True: jax.distributed.initialize() (multi-host).
  config.coordinator_address = ''  # 'host:port' of process 0; '' = auto-detect (TPU, SLURM).
  config.num_processes = 0  # 0 = auto-detect.
  config.process_id = -1  # -1 = auto-detect.

  # --- phase 0: full-precision training (0 epochs with init_from) ----------------------
  config.fp = ml_collections.ConfigDict()
  config.fp.num_epochs = 0
  config.fp.optimizer = 'adam'  # 'sgd' or 'adam'
  config.fp.learning_rate = 1e-3
  config.fp.schedule = 'cosine'  # 'cosine' or 'constant'
  config.fp.momentum = 0.9
  config.fp.nesterov = True
  config.fp.weight_decay = 0.0  # Coupled L2 added to the gradient.

  # --- compression method ---------------------------------------------------------------
  # One of ec2t_jax.methods.names(); built in: 'ec2t', 'absmean', 'twn' (docs/baselines.md).
  # 'ec2t': EC2T (docs/algorithm.md).
  # 'absmean': the BitNet b1.58 baseline (Ma et al. 2024): levels ±mean|W| per layer.
  # 'twn': Ternary Weight Networks (Li & Liu 2016): threshold 0.7·mean|W| per layer, level
  #   ± the mean of the |W| above it.
  # The baselines ternarize the same leaves as EC2T with no entropy term, gradients to the
  # latent weights straight through (Adam with config.ec2t.latent_learning_rate; other
  # params as EC2T's, config.ec2t.learning_rate and weight_decay). With a baseline a frozen
  # stage continues its training (there is no assignment to freeze), EC2T's gamma,
  # init_scale, sustain, p0_min, centroid settings are unused, ecp stages or prune_pattern
  # are refused, and the (γ, s) sweep refuses it.
  config.method = 'ec2t'

  # --- phases 1 and 2: EC2T, then frozen assignment (docs/algorithm.md §3–5) -------------
  config.ec2t = ml_collections.ConfigDict()
  config.ec2t.num_epochs = 20
  config.ec2t.frozen_epochs = 15
  # 'last': the frozen stage continues from the last EC2T step; 'best': from the best EC2T
  # checkpoint by validation accuracy (weights, BatchNorm, assignment, centroids), as the
  # original does (it chose on the test set; this program on the validation split).
  config.ec2t.frozen_start_from = 'last'
  config.ec2t.gamma = 0.15  # Entropy gain γ (the original's --lambda-max-divrs).
  config.ec2t.init_scale = 0.3  # Initial centroid scale s (the original's --ini-c-divrs).
  config.ec2t.sustain = 0.05
  config.ec2t.p0_min = 0.5
  config.ec2t.centroid_floor_std = 0.675
  config.ec2t.latent_learning_rate = 1e-4  # Adam, latent weights.
  config.ec2t.centroid_learning_rate = 1e-5  # Adam, centroids.
  config.ec2t.learning_rate = 1e-4  # Adam, all other params ...
  config.ec2t.weight_decay = 5e-6  # ... with coupled L2.
  config.ec2t.reference_parity = False  # True reproduces the original's quirks.
  # Which kernels are ternary: all conv/dense kernels except first, last and shortcuts,
  # unless ternary_pattern (a regex on 'layer/kernel' paths) is given.
  config.ec2t.keep_first = True
  config.ec2t.keep_last = True
  config.ec2t.keep_pattern = '(shortcut|downsample)'
  config.ec2t.ternary_pattern = ''
  config.ec2t.ternary_exclude = ''
  config.ec2t.prune_pattern = ''  # Kernels to prune with ECP (docs/algorithm.md §6).

  # --- stages (docs/recipes.md) ---------------------------------------------------------
  # Empty: the run is full precision (config.fp) -> EC2T -> frozen (config.ec2t). Otherwise
  # named stages, each a ConfigDict with kind ('fp', 'ec2t', 'frozen', 'ecp'), num_epochs,
  # start_from ('last' or 'best'), and any field of config.fp / config.ec2t it overrides
  # (plus fixed_pattern); stage_order lists their names in order, e.g. 'ternarize,frozen'.
  config.stages = ml_collections.ConfigDict()
  config.stage_order = ''

  # --- the finished network, as scoring, export and the report read it -------------------
  # Kernels matching pattern are magnitude-pruned there: weights below fraction x the
  # layer's largest magnitude become 0 (the original's --prune-threshold for EfficientNet's
  # depthwise convs). '' = none. Checkpoints keep the trained values.
  config.magnitude_prune = ml_collections.ConfigDict()
  config.magnitude_prune.pattern = ''
  config.magnitude_prune.fraction = 0.0
  # The input side `python -m ec2t_jax.scoring` counts at; 0 = the training image size.
  config.score_image_size = 0

  # --- logging and checkpoints ---------------------------------------------------------
  # --- distillation (docs/training.md): (1 - w)·CE + w·T²·KL(teacher_T || student_T) ----
  config.distill = ml_collections.ConfigDict()
  # '' = none; 'fp' = this run's full-precision network (the end of its fp stage, else the
  # init_from network); or a path: a finished run's workdir, an orbax variables dir, a .pt.
  config.distill.teacher = ''
  config.distill.temperature = 4.0
  # w of the stages that distill; a stage may set its own distill_weight / distill_temperature
  # (full-precision stages distill only where they set distill_weight).
  config.distill.weight = 0.5
  # Which stages distill: '' = every compressing stage (a frozen stage as the stage it
  # continues); else their names, comma-separated, e.g. 'frozen' (the default sequence's
  # stages are fp, ec2t, frozen) to distill only while the assignment is frozen.
  config.distill.stages = ''

  config.log_every_steps = 100
  # Training steps per compiled call: k > 1 runs k steps as one scan over k batches, so the
  # host dispatches once per k steps (accelerators, TPUs). Results do not depend on k.
  config.steps_per_call = 1
  config.checkpoint_every_steps = 1000
  config.max_to_keep = 3
  # True: start over; the old run (checkpoints, best/, metrics, summary) is moved to
  # WORKDIR/overwritten-<time>/. Use it once: a restart with it still set starts over again.
  config.overwrite = False
  # JAX's persistent compilation cache: a resumed or repeated run loads its compiled
  # steps instead of compiling again. '' = off; $JAX_COMPILATION_CACHE_DIR wins if set.
  config.compilation_cache_dir = '~/.cache/ec2t_jax/xla'
  return config
