"""detectron2 components of eql_d2, registered in detectron2's registries on import."""
