"""The tools served to outside agents: an MCP server (`quantloop mcp`) over the same schemas as quantloop.tools."""
