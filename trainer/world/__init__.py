"""The built-in world where DreamBooth runs on a CPU: the procedural world of shapes, colours
and places (`scenes`), the pretraining of the tiny text-to-image model and of the judge from
nothing but that world (`tiny`, `judge`), and the shipped results (`assets/`)."""
