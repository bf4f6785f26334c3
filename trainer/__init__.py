"""The DreamBooth trainer (`dbtrain`): one training loop over diffusers' UNet, on dbkernels' ops.

Layers, each a package that may import only the ones listed before it (tests/test_layers.py checks):
  errors        UserError and Resumable, the one-line failures every layer raises
  options       typed options per concern, the flags (diffusers' names) and TOML built from them, checks
  formats       files: the output folder we own, safe loading, single-file / kohya LoRA / embedding files
  families      SD 1.x/2.x and SDXL: everything that differs between model families, one module each
  distributed   torchrun data parallel and --shard (ZeRO stage 2)
  methods       what trains and what is saved: full DreamBooth, LoRA, Textual Inversion, pivotal tuning
  core          the one training loop: step, batches, images, class images, checkpoints, run log
  memory        `dbtrain estimate`: the step's peak GPU memory from fake tensors
  world         the built-in world: scenes, tiny models, judge, metrics, evaluation, the demo
  fabric        FABRIC sampling (no training)
  ui            `dbtrain ui`: the web app (Gradio, the [ui] extra) over `dbtrain` child processes
  commands      one module per `dbtrain` command (trainer.cli dispatches; `python -m trainer`)
The kernel library `dbkernels` sits below all of them; benchmarks and experiments live in bench/.
"""
