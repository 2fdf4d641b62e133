"""Progress reporting: a no-op base; the CLI supplies a rich bar or plain log lines."""


class Progress:
    def phase(self, name: str, total_bytes: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def log(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass
