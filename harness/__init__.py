"""ATSC knowledge-distillation harness: recipes in, distilled students out."""
