"""End-to-end recipes that chain the stages (the demo); commands and notebooks call them."""
