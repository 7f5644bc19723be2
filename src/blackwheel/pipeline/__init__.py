"""pipeline: one recipe, one stack, one target into a verified wheel (build); a whole stack (stack_build)."""
