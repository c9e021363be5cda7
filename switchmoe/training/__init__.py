"""Training: the train step and loop (`trainer`), composed from the parts of `seams` that
`features` registers; initialising from another run or a Hugging Face checkpoint (`init_from`),
knowledge distillation (`distillation`), stopping cleanly on a signal (`preemption`) and whether
a config fits in device memory (`memory_fit`)."""
