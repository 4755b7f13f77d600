"""The concepts the mini world draws, their names across datasets, the scene kinds and place styles.

Labels are rendered as concept ids (index into CONCEPTS); each dataset then names a subset of
concepts in its own words (see data_manifests/mini/vocabularies.yaml), as real benchmarks do.
"""
from __future__ import annotations

CONCEPTS = ("sky", "road", "sidewalk", "building", "vegetation", "grass", "car", "person", "pole",
            "wall", "floor", "ceiling", "window", "door", "table", "chair", "sofa", "lamp",
            "water", "mountain", "path", "bench", "rock")
CONCEPT_ID = {c: i for i, c in enumerate(CONCEPTS)}

# Every name a concept goes by somewhere; captions draw from these so the tiny CLIP's text tower
# learns that "vehicle" and "car" are the same thing.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "sky": ("sky",),
    "road": ("road", "street", "roadway"),
    "sidewalk": ("sidewalk", "pavement", "footpath"),
    "building": ("building", "house", "facade"),
    "vegetation": ("vegetation", "tree", "trees", "bush"),
    "grass": ("grass", "terrain", "lawn", "field", "non-drivable fallback"),
    "car": ("car", "vehicle", "automobile"),
    "person": ("person", "pedestrian", "people", "human"),
    "pole": ("pole", "utility pole", "post"),
    "wall": ("wall",),
    "floor": ("floor", "ground floor", "flooring"),
    "ceiling": ("ceiling",),
    "window": ("window", "windowpane"),
    "door": ("door", "doorway"),
    "table": ("table", "desk", "dining table"),
    "chair": ("chair", "seat"),
    "sofa": ("sofa", "couch"),
    "lamp": ("lamp", "light", "floor lamp"),
    "water": ("water", "lake", "pond"),
    "mountain": ("mountain", "hill", "hills"),
    "path": ("path", "dirt path", "trail", "ground"),
    "bench": ("bench", "park bench"),
    "rock": ("rock", "stone", "boulder"),
}

# Names the base segmenter never trains with (they still occur in CLIP captions): the test of
# open-vocabulary transfer. No shipped dataset vocabulary uses them.
HELD_OUT_NAMES = frozenset({"roadway", "footpath", "facade", "lawn", "automobile", "human", "flooring",
                            "boulder", "trail", "hills"})

# The concepts each scene kind can contain (what its layout grammar draws).
SCENE_KINDS: dict[str, tuple[str, ...]] = {
    "street": ("sky", "road", "sidewalk", "building", "vegetation", "grass", "car", "person", "pole"),
    "indoor": ("wall", "floor", "ceiling", "window", "door", "table", "chair", "sofa", "lamp", "person"),
    "park": ("sky", "grass", "vegetation", "water", "mountain", "path", "bench", "person", "rock"),
}
SCENE_WORDS = {"street": ("street", "city street", "road scene"),
               "indoor": ("room", "indoor room", "living room"),
               "park": ("park", "nature scene", "landscape")}

# Place styles: base RGB colours per concept (0-1) and layout tendencies.
_BASE = {
    "sky": (0.55, 0.72, 0.92), "road": (0.36, 0.36, 0.38), "sidewalk": (0.62, 0.60, 0.57),
    "building": (0.70, 0.64, 0.55), "vegetation": (0.20, 0.45, 0.18), "grass": (0.42, 0.62, 0.25),
    "car": (0.6, 0.1, 0.1), "person": (0.3, 0.3, 0.5), "pole": (0.45, 0.45, 0.45),
    "wall": (0.85, 0.82, 0.75), "floor": (0.55, 0.40, 0.25), "ceiling": (0.93, 0.93, 0.90),
    "window": (0.70, 0.85, 0.98), "door": (0.45, 0.28, 0.15), "table": (0.50, 0.33, 0.18),
    "chair": (0.30, 0.22, 0.15), "sofa": (0.35, 0.40, 0.60), "lamp": (0.95, 0.90, 0.70),
    "water": (0.20, 0.40, 0.60), "mountain": (0.45, 0.48, 0.55), "path": (0.68, 0.55, 0.40),
    "bench": (0.40, 0.26, 0.14), "rock": (0.50, 0.50, 0.48),
}
STYLES: dict[str, dict] = {
    # beige stone facades, grey roads, moderate building heights
    "european": {"colors": _BASE, "building_height": (0.25, 0.45), "road_width": (0.32, 0.45),
                 "people": 2, "cars": 2},
    # brick-red and glass-blue towers, dark wide asphalt, many cars
    "american": {"colors": {**_BASE, "building": (0.62, 0.30, 0.24), "road": (0.22, 0.22, 0.24),
                            "sidewalk": (0.72, 0.72, 0.70), "wall": (0.78, 0.80, 0.84),
                            "floor": (0.40, 0.42, 0.45), "grass": (0.35, 0.58, 0.30)},
                 "building_height": (0.35, 0.6), "road_width": (0.42, 0.55), "people": 1, "cars": 3},
    # bright painted houses, dusty roads, sandy terrain, crowded
    "indian": {"colors": {**_BASE, "building": (0.86, 0.55, 0.35), "road": (0.52, 0.46, 0.40),
                          "sidewalk": (0.72, 0.60, 0.45), "grass": (0.62, 0.58, 0.32),
                          "vegetation": (0.30, 0.42, 0.15), "wall": (0.90, 0.75, 0.50),
                          "sky": (0.70, 0.76, 0.82), "path": (0.76, 0.60, 0.42)},
               "building_height": (0.18, 0.35), "road_width": (0.30, 0.42), "people": 4, "cars": 2},
    # dark timber and white walls, pale roads, cold greens
    "nordic": {"colors": {**_BASE, "building": (0.32, 0.30, 0.34), "road": (0.48, 0.48, 0.50),
                          "sidewalk": (0.80, 0.80, 0.80), "vegetation": (0.12, 0.32, 0.20),
                          "grass": (0.32, 0.50, 0.30), "wall": (0.95, 0.95, 0.95),
                          "floor": (0.75, 0.68, 0.55), "water": (0.12, 0.28, 0.40)},
               "building_height": (0.22, 0.40), "road_width": (0.30, 0.40), "people": 1, "cars": 1},
}
