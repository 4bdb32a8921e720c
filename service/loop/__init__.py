"""The learning loop: compile feedback, refresh (train, evaluate, gate, promote), schedule,
watch live."""
