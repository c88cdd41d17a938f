from chassis.service import main
from services.members.server import definition

main(definition)
