"""A real MCP client for tests/mcp.rs: the official MCP Python SDK (`mcp` on
PyPI), nothing of ours. Connects over stdio or Streamable HTTP, runs the
steps named on the command line, and prints one JSON object of what it saw
(the Rust test checks it).

    client.py stdio  DATA_DIR -- COMMAND [ARGS...]
    client.py http   URL KEY
    client.py modern URL KEY     (the 2026-07-28 revision, see `modern`)
"""

import asyncio
import json
import sys

import httpx2
from mcp import ClientSession, types
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client


def dump(model):
    return json.loads(model.model_dump_json(by_alias=True, exclude_none=True))


async def scenario(session, seen, notes):
    init = await session.initialize()
    seen["server"] = dump(init)["serverInfo"]
    seen["protocol"] = session.protocol_version

    tools = []
    cursor = None
    while True:
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools += [dump(t) for t in page.tools]
        cursor = page.next_cursor
        if not cursor:
            break
    seen["tools"] = {t["name"]: t for t in tools}

    calls = json.loads(sys.stdin.read() or "[]")
    seen["calls"] = []
    for name, arguments in calls:
        try:
            result = await session.call_tool(name, arguments)
            seen["calls"].append({"ok": True, "result": dump(result)})
        except Exception as e:  # a protocol error: what it said
            seen["calls"].append({"ok": False, "error": str(e)})

    if "--progress" in sys.argv:
        # A call of 1.5 s: the server reports progress after its first second.
        heard = []

        async def on_progress(progress, total, message):
            heard.append(message)

        result = await session.call_tool(
            "python", {"code": "import time\ntime.sleep(1.5)\nresult = 'slept'"}, progress_callback=on_progress
        )
        seen["progress"] = {"heard": heard, "result": dump(result)}

    if "--cancel" in sys.argv:
        # Abandoned after half a second: the SDK sends notifications/cancelled.
        try:
            await session.call_tool("python", {"code": "while True:\n    pass"}, read_timeout_seconds=0.5)
            seen["cancel"] = "answered"
        except Exception as e:
            seen["cancel"] = str(e)

    if "--cancel-session" in sys.argv:
        # A code session's step abandoned after half a second: the step is
        # stopped, its session with it; the next call says so, the one after
        # opens a new session.
        steps = seen["cancel_session"] = []
        await session.call_tool("python", {"code": "x = 41", "session": True})
        try:
            await session.call_tool("python", {"code": "while True:\n    pass", "session": True}, read_timeout_seconds=0.5)
            steps.append("answered")
        except Exception as e:
            steps.append(str(e))
        for code in ["x + 1", "y = 2\ny"]:
            steps.append(dump(await session.call_tool("python", {"code": code, "session": True})))

    resources = await session.list_resources()
    seen["resources"] = [dump(r) for r in resources.resources]
    if resources.resources:
        read = await session.read_resource(resources.resources[0].uri)
        seen["read"] = dump(read)
    try:
        await session.read_resource("file:///data/../../etc/passwd")
        seen["escape"] = "read"
    except Exception as e:
        seen["escape"] = str(e)
    if "--wait-for-list-changed" in sys.argv:
        # The test registers a tool once it reads this line.
        print("READY", flush=True)
        for _ in range(300):
            if "notifications/tools/list_changed" in notes:
                break
            await asyncio.sleep(0.05)
    seen["notifications"] = notes


async def modern(url, key):
    """The 2026-07-28 revision: no initialize (server/discover, then
    per-request metadata); tool list changes on a `subscriptions/listen`
    stream. The test registers a tool once it reads READY."""
    import anyio
    import mcp_types
    from mcp.client.subscriptions import listen

    seen = {}
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                raw = await session.send_discover("2026-07-28")
                session.adopt(mcp_types.DiscoverResult.model_validate(raw))
                seen["protocol"] = session.protocol_version
                tools = await session.list_tools()
                seen["tools"] = [t.name for t in tools.tools]
                seen["call"] = dump(await session.call_tool("python", {"code": "6 * 7"}))
                # Abandoned after half a second: at 2026-07-28 the SDK closes
                # the request's response stream, which is its cancellation.
                try:
                    await session.call_tool("python", {"code": "while True:\n    pass"}, read_timeout_seconds=0.5)
                    seen["cancel"] = "answered"
                except Exception as e:
                    seen["cancel"] = str(e)
                try:
                    await session.call_tool("python", {"code": "x = 1", "session": True})
                    seen["session"] = "answered"
                except Exception as e:
                    seen["session"] = str(e)
                async with listen(session, tools_list_changed=True) as subscription:
                    seen["honored"] = dump(subscription.honored)
                    print("READY", flush=True)
                    with anyio.fail_after(15):
                        async for event in subscription:
                            seen["event"] = type(event).__name__
                            seen["after_event"] = [t.name for t in (await session.list_tools()).tools]
                            break
    print(json.dumps(seen))


async def main():
    if sys.argv[1] == "modern":
        await modern(sys.argv[2], sys.argv[3])
        return
    seen = {}
    notes = []

    async def on_message(message):
        root = getattr(message, "root", message)
        method = getattr(root, "method", None)
        if method:
            notes.append(method)

    if sys.argv[1] == "stdio":
        command = sys.argv[sys.argv.index("--") + 1:]
        params = StdioServerParameters(command=command[0], args=command[1:])
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write, message_handler=on_message) as session:
                await scenario(session, seen, notes)
    else:
        url, key = sys.argv[2], sys.argv[3]
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            async with streamable_http_client(url, http_client=http) as (read, write):
                async with ClientSession(read, write, message_handler=on_message) as session:
                    await scenario(session, seen, notes)
    print(json.dumps(seen))


asyncio.run(main())
