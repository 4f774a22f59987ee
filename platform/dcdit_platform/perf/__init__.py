"""What models cost on this machine and on paper: training-step speed (`dcdit bench`) and FLOPs (`dcdit flops`)."""
