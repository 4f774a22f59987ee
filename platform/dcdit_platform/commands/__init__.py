"""Sub-commands of the `dcdit` CLI, one module each: argument parsing, then one call into the package.

Each command imports its implementation inside the function that runs it. Building the parser imports every
command module, so top-level imports would make `dcdit --help` (and every command) pay for importing torch, Ray,
MLflow and diffusers: 1.9 s with the imports inside the functions against 8.3 s with them at the top (measured on
the project's 2-core machine). This is the one place in the package where imports are deferred for that reason.
"""
