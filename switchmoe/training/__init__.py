"""Training: the train step and loop (`trainer`), initialising from another run or a Hugging
Face checkpoint (`init_from`), knowledge distillation (`distillation`) and whether a config fits
in device memory (`memory_fit`)."""
