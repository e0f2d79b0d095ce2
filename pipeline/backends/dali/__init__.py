"""The DALI backend: webdataset shards or an ImageFolder tree, decoded (nvJPEG on a GPU) and augmented in a DALI
graph (`pipeline.dali_augment`). `loader.py` reads, `format.py` is the shard format `byol convert` writes,
`image_files.py` checks a plain folder's files before DALI decodes them, `lifetime.py` keeps the pipelines' builds and
teardowns off the consumer's path, `settings.py` is `data.dali`."""
from __future__ import annotations

from pathlib import Path

from byolfast.pipeline.backends import Backend, Knob, Writer
from byolfast.pipeline.backends.dali import format as shard_format
from byolfast.pipeline.backends.dali.settings import DaliConfig


def _loader(cfg, ctx):
    from byolfast.pipeline.backends.dali.loader import DaliTwoViewLoader  # DALI is imported only when asked for
    return DaliTwoViewLoader(cfg, ctx, exact_hue=cfg.dali.exact_hue)


def _advice(cfg, device_type: str, cpu_count: int, stats: dict) -> list[str]:
    d, tips = cfg.dali, []
    if device_type == "cuda" and stats.get("decoder", d.decoder) != "mixed":   # the decoder it fell back to, if any
        tips.append("use data.dali.decoder=mixed: nvJPEG decodes on the GPU instead of the CPU threads")
    if d.num_threads < cpu_count:
        tips.append(f"raise data.dali.num_threads from {d.num_threads} towards the {cpu_count} CPU cores")
    if device_type == "cuda" and not d.random_crop_decoder:   # off by default: see DaliConfig.random_crop_decoder
        tips.append("measure data.dali.random_crop_decoder=true (`byol bench --what loader "
                    "data.dali.random_crop_decoder=true`): it decodes only each view's crop window; no faster on "
                    "CPUs, not yet measured with nvJPEG")
    return tips


def _knobs(device_type: str, ladder: tuple) -> list[Knob]:
    gpu = [Knob("data.dali.decoder", ("mixed", "cpu")),
           Knob("data.dali.hw_decoder_load", (0.0, 0.25, 0.5, 0.65, 0.8, 1.0), True, ("data.dali.decoder", "mixed"))]
    return [Knob("data.dali.num_threads", ladder, True), *(gpu if device_type == "cuda" else []),
            Knob("data.dali.random_crop_decoder", (False, True)),
            Knob("data.dali.prefetch_queue_depth", (1, 2, 3, 4, 6), True)]


def _bench_path(converted: Path) -> str:
    return str(converted / "dali")


BACKEND = Backend(
    name="dali", summary="DALI: shards or a folder, decoded and augmented in a DALI graph (nvJPEG on a GPU)",
    loader=_loader, settings=DaliConfig,
    writer=Writer(settings=shard_format.convert_settings, complete=shard_format.complete_output,
                  write=shard_format.write_output, uses_pool=True),
    bench_path=_bench_path, advice=_advice, knobs=_knobs, requires=("nvidia.dali",), first_start_s=5.0)
