"""What a trained model learned: the evaluation tool (evaluate), its scores (metrics: labels, ontology,
distributions, perturbation effects) and the cell embedders for scFID (embed)."""
