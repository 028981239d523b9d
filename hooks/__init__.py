"""Finding the loop in a model, hooking it, and labelling each iteration."""
