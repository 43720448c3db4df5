"""The HTTP layer: TGI's and OpenAI's APIs over the async engine. Nothing here touches a tensor."""
