"""Class colours: one palette, distinct for the large vocabularies, the same in overlays and legends."""
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.spatial.distance import pdist

from semla_lab.evaluation import plots


def test_one_palette_distinct_for_171_classes_in_overlays_and_legends():
    """COCO-Stuff's 171 classes get 171 distinct colours, none black (ignore); a class has the same colour in a
    colourised mask, the notebook legend and the overlay's legend."""
    names = [f"class {i}" for i in range(171)]
    colours = plots.colorize(torch.arange(171)[None])[0]                          # (171, 3)
    assert pdist(colours.astype(float)).min() >= 15 and (colours.sum(1) > 0).all()
    legend = plots.label_legend(names)
    drawn = np.array([p.get_facecolor()[:3] for p in legend.axes[0].patches]) * 255
    plt.close(legend)
    assert np.abs(drawn - colours).max() < 0.5
    pad = 2                                                      # overlay_with_legend's padding on a 64-px image
    for c in (3, 40, 170):
        out = plots.overlay_with_legend(torch.zeros(3, 64, 64), torch.full((64, 64), c), names)
        assert tuple(out[pad + 2, pad + 2]) == tuple(colours[c]), c               # inside the legend's swatch
        assert tuple(out[63, 63]) == tuple((colours[c] * 0.5).astype(np.uint8)), c   # the overlay, alpha 0.5
