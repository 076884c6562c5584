"""The Modal reference's coding agent, runnable here: a graph of "generate code" → "execute it in
a Sandbox" (→ back to "generate" with the error, at most three tries).

    mctl run examples/agent/agent.py --task "Create a function that calculates the factorial of a number"

The model: with a Secret named `openai-secret` (OPENAI_API_KEY) and `langchain-openai` installed,
a real LLM writes the code (`mctl secret create openai-secret OPENAI_API_KEY=...`); otherwise a
small deterministic stand-in model that knows a handful of tasks (factorial, fibonacci, primes),
so the example runs offline. The graph is LangGraph's StateGraph when `langgraph` is installed,
else a plain state machine of the same shape. The code always runs in an mctl.Sandbox (gVisor,
no network): an LLM's code is untrusted code.
"""

from __future__ import annotations

import os
import re

import mctl

app = mctl.App("coding-agent")
SECRET = "openai-secret"
MAX_TRIES = 3


def _have_secret() -> bool:
    """Whether the LLM's key exists (checked where the app is deployed from, not in workers)."""
    if not mctl.is_local():
        return False
    try:
        from mctl.core import secret_store

        return any(s.name == SECRET for s in secret_store.list_secrets())
    except Exception:  # noqa: BLE001 - no secret backend here: the stand-in model it is
        return False


# --- the model ------------------------------------------------------------------------------------
STAND_IN = {
    "factorial": (
        "def factorial(n):\n"
        "    result = 1\n"
        "    for i in range(2, n + 1):\n"
        "        result *= i\n"
        "    return result\n\n"
        "assert factorial(0) == 1 and factorial(5) == 120\n"
        "print('factorial(10) =', factorial(10))\n"),
    "fibonacci": (
        "def fibonacci(n):\n"
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b\n"
        "    return a\n\n"
        "assert [fibonacci(i) for i in range(7)] == [0, 1, 1, 2, 3, 5, 8]\n"
        "print('fibonacci(30) =', fibonacci(30))\n"),
    "prime": (
        "def primes(limit):\n"
        "    sieve = [True] * (limit + 1)\n"
        "    sieve[0:2] = [False, False]\n"
        "    for i in range(2, int(limit ** 0.5) + 1):\n"
        "        if sieve[i]:\n"
        "            sieve[i * i::i] = [False] * len(sieve[i * i::i])\n"
        "    return [i for i, p in enumerate(sieve) if p]\n\n"
        "assert primes(20) == [2, 3, 5, 7, 11, 13, 17, 19]\n"
        "print('primes below 50:', primes(50))\n"),
}


class StandInModel:
    """A deterministic model for offline runs: code for the tasks it knows, by keyword."""

    name = "stand-in"

    def predict(self, prompt: str) -> str:
        task = prompt.splitlines()[0].lower()  # the task, not the feedback below it
        for keyword, code in STAND_IN.items():
            if keyword in task:
                return f"```python\n{code}```"
        known = ", ".join(STAND_IN)
        return f"```python\nraise SystemExit('the stand-in model only knows: {known}')\n```"


def make_model():
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        try:
            from langchain_openai import ChatOpenAI

            llm = ChatOpenAI()

            class LLM:
                name = "openai"

                def predict(self, prompt: str) -> str:
                    return llm.invoke(prompt).content

            return LLM()
        except ImportError:
            pass
    return StandInModel()


@app.function(secrets=[mctl.Secret.from_name(SECRET)] if _have_secret() else [])
def write_code(task: str, feedback: str = "") -> dict:
    """The "generate" node's model call, in a function (where the API key Secret is)."""
    model = make_model()
    prompt = f"Write a self-contained Python script for: {task}. Print its result."
    if feedback:
        prompt += f"\nThe previous attempt failed with:\n{feedback}\nFix it."
    return {"model": model.name, "reply": model.predict(prompt)}


def extract_code(reply: str) -> str:
    match = re.search(r"```(?:python)?\n(.*?)```", reply, re.S)
    return match.group(1) if match else reply


# --- the graph ------------------------------------------------------------------------------------
class SimpleStateGraph:
    """LangGraph's StateGraph, the part this agent uses: nodes return updates to a dict
    state; edges are fixed or chosen by a function of the state."""

    END = "__end__"

    def __init__(self, _state_type: object = dict) -> None:
        self.nodes: dict = {}
        self.edges: dict = {}
        self.entry = None

    def add_node(self, name, fn):
        self.nodes[name] = fn

    def set_entry_point(self, name):
        self.entry = name

    def add_edge(self, src, dst):
        self.edges[src] = lambda state: dst

    def add_conditional_edges(self, src, choose, mapping=None):
        self.edges[src] = lambda state: (mapping or {}).get(choose(state), choose(state))

    def compile(self):
        graph = self

        class Compiled:
            def invoke(self, state):
                state, node = dict(state), graph.entry
                while node != graph.END:
                    state.update(graph.nodes[node](state) or {})
                    node = graph.edges[node](state)
                return state

        return Compiled()


def graph_class():
    try:
        from langgraph.graph import END, StateGraph

        return StateGraph, END
    except ImportError:
        return SimpleStateGraph, SimpleStateGraph.END


def create_agent():
    StateGraph, END = graph_class()

    def generate_code(state):
        out = write_code.remote(state["human_input"], state.get("error", ""))
        return {"code": extract_code(out["reply"]), "model": out["model"],
                "tries": state.get("tries", 0) + 1}

    def execute_code(state):
        sandbox = mctl.Sandbox.create(app=app, timeout=120)
        try:
            p = sandbox.exec("python", "-c", state["code"], timeout=60)
            result, error = p.stdout.read(), p.stderr.read()
            rc = p.wait()
        finally:
            sandbox.terminate()
        return {"result": result, "error": error if rc else "", "returncode": rc,
                "isolation": sandbox.isolation}

    def next_step(state):
        done = state["returncode"] == 0 or state["tries"] >= MAX_TRIES
        return END if done else "generate"

    workflow = StateGraph(dict)
    workflow.add_node("generate", generate_code)
    workflow.add_node("execute", execute_code)
    workflow.set_entry_point("generate")
    workflow.add_edge("generate", "execute")
    workflow.add_conditional_edges("execute", next_step)
    return workflow.compile()


@app.local_entrypoint()
def main(task: str = "Create a function that calculates the factorial of a number"):
    agent = create_agent()
    state = agent.invoke({"human_input": task})
    print(f"model: {state['model']}, tries: {state['tries']}, sandbox: {state['isolation']}")
    print("code:\n" + state["code"])
    print("result:\n" + state["result"], end="")
    if state["returncode"] != 0:
        print("error:\n" + state["error"], end="")
        raise SystemExit(1)
