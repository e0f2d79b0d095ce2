"""The YAML presets (`demo_cpu.yaml`, `small_gpu.yaml`, `imagenet_r50_paper.yaml`), installed as `byolfast/configs` so
that `byol demo` finds its preset from an installed copy too."""
