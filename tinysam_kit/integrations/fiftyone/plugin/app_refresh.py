"""Showing what an operator or the panel just wrote, in the App that asked for it, without a page reload."""

from __future__ import annotations

from collections.abc import Collection


def app_sample(ctx, sample_id: str) -> dict:
    """The sample as the App's sample queries send it (the current view's fields and label filters; ids,
    dates and masks made JSON-safe the same way)."""
    from fiftyone.core.json import stringify

    try:
        sample = ctx.view[sample_id]
    except (KeyError, ValueError):
        sample = ctx.dataset[sample_id]
    return stringify(sample.to_mongo_dict(include_id=True))


def show_written(ctx, plugin_name: str, field: str, sample_ids: Collection[str], new_field: bool) -> None:
    """Redraw the grid; when the open sample modal shows one of `sample_ids`, bring it up to date too.

    The modal keeps its own copies of the sample, of the sidebar and of the shown fields; the plugin's App part
    (js/tinysam.js, operator `refresh_open_sample`) updates them, the schema included."""
    ctx.ops.reload_samples()  # the grid draws the new masks
    if ctx.current_sample and ctx.current_sample in sample_ids:
        ctx.trigger(f"{plugin_name}/refresh_open_sample",
                    {"field": field, "sample": app_sample(ctx, ctx.current_sample)})
    elif new_field:
        ctx.ops.reload_dataset()  # the sidebar learns the new field
