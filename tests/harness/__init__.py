"""Real-component test harness: Debian's docker-registry, image pushes, skopeo pulls."""
