"""Synthetic receipt-count scenes for `scripts/make_receipts.py`.

    data.synth.scene.render_scene(rng, size, receipt_count) -> (RGB image, JPEG quality)
    data.synth.paper   -- receipts and other paperwork as RGBA sheets
    data.synth.content -- invented text for them
    data.synth.probe   -- `shortcut_features`, `probe_accuracy`, `probe_sources`: do trivial
                          image statistics predict the class? (`scripts/probe_shortcut.py`)
"""
