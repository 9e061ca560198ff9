"""``vlm parts``: list what the registry can build, by kind."""


def add_arguments(parser):
    parser.add_argument("kind", nargs="?", choices=["tower", "projector", "llm", "adapter"],
                        help="only this kind (default: all)")


def run(args) -> int:
    from vlm import registry

    kinds = [args.kind] if args.kind else list(registry.KINDS)
    for k in kinds:
        print(f"{k}:")
        for spec in registry.available(k):
            print(f"  {spec}")
    return 0
