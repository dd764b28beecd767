"""FiftyOne plugin `@tinysam-kit/tinysam`: TinySAM operators in the App, a model for `apply_model`, and
resumable dataset-wide pre-annotation.

FiftyOne loads this file by path under a synthetic module name, so the operators are imported with
absolute imports (tinysam-kit must be installed in FiftyOne's environment). This folder holds only what
FiftyOne loads: the manifest, this file, the operators, the click-to-segment panel, and the App script
(`js/tinysam.js`, plain browser JavaScript) that shows freshly written masks in the open sample modal.
"""


def register(plugin) -> None:
    from tinysam_kit.integrations.fiftyone.plugin.operators import OPERATORS
    from tinysam_kit.integrations.fiftyone.plugin.panel import PANELS

    for operator in OPERATORS:
        plugin.register(operator)
    for panel in PANELS:
        plugin.register(panel)
