"""Gap science without a model: ForestGapR gap masks, components, polygons, analyses, the classical method."""
